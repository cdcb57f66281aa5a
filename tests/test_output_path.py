"""TargetModel's output path reproduces the model's own logits (families that scale them included), and a model
whose head does more than it reproduces is refused at load rather than sampled from the wrong distribution."""

import types

import pytest
import torch
from tiny_models import VOCAB, tiny_gemma3
from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

from mtp_mcp.engine.errors import ModelLoadError
from mtp_mcp.engine.target import TargetModel

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def granite():
    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=8.0)).eval()


def cohere():
    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.0625)).eval()


@pytest.mark.parametrize("build", [granite, cohere, lambda: tiny_gemma3(seed=0)], ids=["granite", "cohere", "gemma3"])
def test_logits_equal_the_model_s_own(build):
    model = build()
    target = TargetModel(model)
    target.check_output_path()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        expected = model(ids).logits[0].float()
        hidden = target.prefill(ids[0].tolist()[:-1])
        last = target.forward(ids[0].tolist()[-1:], logits_for_last=1)
        # Fed in two pieces, so float rounding differs a little; a missing scale (x 1/8, x 1/16) would not.
        torch.testing.assert_close(target.logits(torch.cat([hidden, last.hidden])), expected, rtol=1e-4, atol=1e-5)
        assert target.greedy_tokens(last.hidden) == [int(expected[-1].argmax())]


def test_a_head_that_does_more_is_refused():
    model = tiny_gemma3(seed=0)
    stock_forward = model.forward

    def scaled_hidden_forward(self, *args, **kwargs):  # as MiniCPM scales hidden states before its head
        output = stock_forward(*args, **kwargs)
        output.logits = output.logits * 0.5 + 1.0
        return output

    model.forward = types.MethodType(scaled_hidden_forward, model)
    with pytest.raises(ModelLoadError, match="computes its logits in a way this engine does not reproduce"):
        TargetModel(model).check_output_path()

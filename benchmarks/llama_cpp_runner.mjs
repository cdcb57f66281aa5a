// llama.cpp's plain greedy decoding for `mtp-mcp bench`, through node-llama-cpp's prebuilt CPU binaries.
// node llama_cpp_runner.mjs PREFIX MODEL.gguf THREADS CONTEXT, where PREFIX is the folder npm installed node-llama-cpp into
// (`npm install --prefix PREFIX node-llama-cpp@VERSION`): loads the model once, prints {"ready": ...}, then answers one JSON
// request per stdin line, {"prompt", "add_bos", "max_tokens"}, with one JSON line on stdout:
// {"token_ids", "seconds"} (time from the prompt's evaluation to the last token, prefill included, tokenization
// excluded, as the Python methods count it). Logs go to stderr.
import path from "node:path";
import readline from "node:readline";
import {pathToFileURL} from "node:url";

const [prefix, modelPath, threads, contextSize] = process.argv.slice(2);
// An ES module finds packages beside itself only, so the package is imported from where npm put it.
const {getLlama, LlamaLogLevel} = await import(
  pathToFileURL(path.join(prefix, "node_modules", "node-llama-cpp", "dist", "index.js")).href);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: Number(contextSize), threads: Number(threads)});
const sequence = context.getSequence();
console.log(JSON.stringify({ready: true, threads: context.currentThreads}));

for await (const line of readline.createInterface({input: process.stdin})) {
  const request = JSON.parse(line);
  const tokens = model.tokenize(request.prompt, true);
  if (request.add_bos && model.tokens.bos !== null) tokens.unshift(model.tokens.bos);
  await sequence.clearHistory();
  const generated = [];
  const started = performance.now();
  if (request.max_tokens > 0) {
    for await (const token of sequence.evaluate(tokens, {temperature: 0})) {
      generated.push(token);
      if (model.isEogToken(token) || generated.length >= request.max_tokens) break;
    }
  }
  const seconds = (performance.now() - started) / 1000;
  console.log(JSON.stringify({token_ids: generated, seconds}));
}

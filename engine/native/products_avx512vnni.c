/* The products for AVX-512 VNNI (products_x86.h): few activation rows (decoding, a short verification) on 256-bit
 * registers, where one dpbusd forms and adds what maddubs + madd + add do; more rows unpacked, two row blocks per
 * 512-bit register, 8 activation rows a tile. Q6_K stays on block_tile: its signed values need their signs moved
 * onto the activations, which has no 512-bit instruction.
 */
#include "native.h"
#ifdef MTP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#define SUFFIX(name) name##_avx512vnni
#define DOT(acc, u, x) _mm256_dpbusd_epi32(acc, u, x)
#define UNSIGNED_Q8_0 1

#define UNPACKED_BLOCKS 2
#define UNPACKED_TILE 8 /* 2 x 8 accumulators of the 32 registers */
#define VI __m512i
#define VF __m512
#define VI_LOAD(p) _mm512_load_si512((const void *)(p))
#define VI_ZERO() _mm512_setzero_si512()
#define VI_SET1(v) _mm512_set1_epi32(v)
#define VI_SUB(x, y) _mm512_sub_epi32(x, y)
#define VI_DOT(acc, u, x) _mm512_dpbusd_epi32(acc, u, x)
#define VF_ZERO() _mm512_setzero_ps()
#define VF_LOAD(p) _mm512_load_ps(p)
#define VF_SET1(v) _mm512_set1_ps(v)
#define VF_CVT(v) _mm512_cvtepi32_ps(v)
#define VF_MUL(x, y) _mm512_mul_ps(x, y)
#define VF_FMADD(x, y, z) _mm512_fmadd_ps(x, y, z)
#define VF_STORE_FIRST(out, v, n) _mm512_mask_storeu_ps(out, (__mmask16)((1u << (n)) - 1), v)
#include "products_x86.h"
#pragma GCC pop_options
#endif

/* The products for AVX2 + FMA + F16C (products_x86.h): few activation rows by block_tile; more rows unpacked, one
 * row block per 256-bit register, 4 activation rows a tile. Q8_0 and Q6_K stay on block_tile: their signed values
 * need their signs moved onto the activations (maddubs multiplies unsigned by signed bytes, and w + 128 would
 * saturate its int16 pairs). */
#include "native.h"
#ifdef MTP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SUFFIX(name) name##_avx2
/* maddubs: pairs of u * x in int16, madd: pairs of those in int32 */
#define DOT(acc, u, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))

#define UNPACKED_BLOCKS 1
#define UNPACKED_TILE 4 /* 2 x 4 accumulators of the 16 registers */
#define VI __m256i
#define VF __m256
#define VI_LOAD(p) _mm256_load_si256((const __m256i *)(p))
#define VI_ZERO() _mm256_setzero_si256()
#define VI_SET1(v) _mm256_set1_epi32(v)
#define VI_SUB(x, y) _mm256_sub_epi32(x, y)
#define VI_DOT(acc, u, x) DOT(acc, u, x)
#define VF_ZERO() _mm256_setzero_ps()
#define VF_LOAD(p) _mm256_load_ps(p)
#define VF_SET1(v) _mm256_set1_ps(v)
#define VF_CVT(v) _mm256_cvtepi32_ps(v)
#define VF_MUL(x, y) _mm256_mul_ps(x, y)
#define VF_FMADD(x, y, z) _mm256_fmadd_ps(x, y, z)
#define VF_STORE_FIRST(out, v, n) SUFFIX(store_first_lanes)(out, v, n)
#include "products_x86.h"
#pragma GCC pop_options
#endif

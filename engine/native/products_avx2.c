/* The products for AVX2 + FMA + F16C (products_x86.h). */
#include "native.h"
#ifdef MTP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define SUFFIX(name) name##_avx2
/* maddubs: pairs of u * x in int16, madd: pairs of those in int32 */
#define DOT(acc, u, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)))
#include "products_x86.h"
#pragma GCC pop_options
#endif

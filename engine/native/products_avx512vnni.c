/* The products for AVX-512 VNNI on 256-bit registers (products_x86.h): one dpbusd forms and adds what maddubs +
 * madd + add do. */
#include "native.h"
#ifdef MTP_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#define SUFFIX(name) name##_avx512vnni
#define DOT(acc, u, x) _mm256_dpbusd_epi32(acc, u, x)
#define UNSIGNED_Q8_0 1
#include "products_x86.h"
#pragma GCC pop_options
#endif

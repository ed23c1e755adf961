/* y (M, N) = x (M, K) w (N, K)^T (+ b) in float32 for a few rows M (a verify pass's tokens), AVX2 + FMA.

   Why: a decode step reads every weight once for one token; a verify pass over a few tokens should cost about the
   same, but torch's kernels on an AVX2 CPU (MKL, oneDNN) cost 1.5-1.9x a one-token product at 2 to 5 rows
   (llm_modules.models.cpu_linear). Here two rows of w at a time are held in L1 while every chunk of up to 6 rows of
   x is multiplied against them (2 x 6 accumulators: 12 of AVX2's 16 registers), so each weight is read from memory
   once for any M. (Chunks of up to 4 cost 10-27% more at 5, 6 and 11 rows here.) Threads
   split the rows of w (OpenMP: torch's own runtime, which is loaded first and shares the soname libgomp.so.1).
   Built on first use by llm_modules.models.small_m. */
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

/* Two rows of w (n, n + 1) against MM rows of x: 2 x MM accumulators; the two w rows stay in L1 for the next
   chunk of x rows. */
#define PAIR(MM) \
static inline void pair_##MM(const float *x, const float *w0, const float *w1, float *y, long K, long N, long n) { \
    __m256 a0[MM], a1[MM]; \
    for (int m = 0; m < MM; m++) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); } \
    long k = 0; \
    for (; k + 8 <= K; k += 8) { \
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k); \
        for (int m = 0; m < MM; m++) { \
            __m256 xv = _mm256_loadu_ps(x + m * K + k); \
            a0[m] = _mm256_fmadd_ps(v0, xv, a0[m]); \
            a1[m] = _mm256_fmadd_ps(v1, xv, a1[m]); \
        } \
    } \
    for (int m = 0; m < MM; m++) { \
        float s0 = hsum(a0[m]), s1 = hsum(a1[m]); \
        for (long kk = k; kk < K; kk++) { s0 += w0[kk] * x[m * K + kk]; s1 += w1[kk] * x[m * K + kk]; } \
        y[m * N + n] = s0; y[m * N + n + 1] = s1; \
    } \
}
PAIR(1) PAIR(2) PAIR(3) PAIR(4) PAIR(5) PAIR(6)

static void single(const float *x, const float *w0, float *y, long M, long K, long N, long n) {
    for (long m = 0; m < M; m++) {
        __m256 a = _mm256_setzero_ps();
        long k = 0;
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), _mm256_loadu_ps(x + m * K + k), a);
        float s = hsum(a);
        for (long kk = k; kk < K; kk++) s += w0[kk] * x[m * K + kk];
        y[m * N + n] = s;
    }
}

static void block(const float *x, const float *w, float *y, long M, long K, long N, long n0, long n1) {
    long n = n0;
    for (; n + 2 <= n1; n += 2) {
        const float *w0 = w + n * K, *w1 = w0 + K;
        long chunks = (M + 5) / 6;  /* balanced: 7 rows as 4 + 3, not 6 + 1 */
        for (long c = 0, m0 = 0; c < chunks; c++) {
            long mm = M / chunks + (c < M % chunks ? 1 : 0);
            const float *xs = x + m0 * K;
            float *ys = y + m0 * N;
            switch (mm) {
                case 1: pair_1(xs, w0, w1, ys, K, N, n); break;
                case 2: pair_2(xs, w0, w1, ys, K, N, n); break;
                case 3: pair_3(xs, w0, w1, ys, K, N, n); break;
                case 4: pair_4(xs, w0, w1, ys, K, N, n); break;
                case 5: pair_5(xs, w0, w1, ys, K, N, n); break;
                default: pair_6(xs, w0, w1, ys, K, N, n); break;
            }
            m0 += mm;
        }
    }
    if (n < n1) single(x, w + n * K, y, M, K, N, n);
}

/* y (M, N) = x (M, K) w (N, K)^T (+ b), row-major float32; every row of w read from memory once. */
void small_m_linear(const float *x, const float *w, const float *b, float *y, long M, long K, long N, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long per = ((N + nt - 1) / nt + 1) & ~1L;
        long n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) block(x, w, y, M, K, N, n0, n1);
    }
    if (b) for (long m = 0; m < M; m++) for (long n = 0; n < N; n++) y[m * N + n] += b[n];
}

// Streaming replica of an expert GEMM with 8 rows per expert (Qwen3-30B-A3B's gate/up GEMM at
// T=128: 8 rows x 1536 weight rows x K 2048, f32), to tell the host's limit from the kernel's.
// Not part of the build: a C program that isolates one memory access pattern.
//
//   gcc -O3 -march=native -pthread benches/replicas/stream8.c -o /tmp/stream8
//   /tmp/stream8 [rounds=40] [experts=40]
//
// Each round runs, one after another and each on 2 threads (thread t takes experts t, t+2, ...),
// three passes over the same `experts` x 1536 x 2048 f32 weights (12.6 MB each, 503 MB for 40,
// far past the caches):
//   read   - read-only: 16-lane loads summed, one sequential stream per thread: the host's
//            read bandwidth at that moment;
//   inplace - the weight-broadcast form of moe-cpu's f32 kernel for 8-row items
//            (moe-cpu/src/gemm/wb.rs, 8-lane half, `NJ = 8`): the weight rows read in place
//            (`[N][K]`, the caller's layout), 8 of them at a time in chunks of 256 along K, each
//            element broadcast against the 8 rows, with the software prefetch of the next chunk
//            into L2 that the AMD tuning enables;
//   panels - the same product with the weights prepacked (once, outside the timing) into
//            panels of 48 columns, `[N / 48][K][48]`: one sequential stream, three 16-lane
//            loads and eight row broadcasts per 24 FMAs (an 8 x 48 register tile).
// It prints each round's rates (GB/s of weights, and GFLOP/s at 4 FLOP per weight byte) and then
// the medians over the rounds, grouped by the read-only rate of the same round (the host's
// bandwidth moves within minutes on shared machines). Both compute forms are checked against a
// double-precision sum of the same products before timing.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N = 1536, K = 2048, NJ = 8, KC = 256, NP = 48, ROWS = 8 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int experts = 40;
static float *w_rows;    // [E][N][K]
static float *w_panels;  // [E][N / NP][K][NP]
static float *a_half;    // [K][8]: the 8 rows, k-major (the packed half of wb.rs)
static float *c_out[2];  // [N][8] per thread
static volatile float sink[2];
static int mode;

// The in-place weight-broadcast form: c[n][r] += sum_k w[n][k] a[k][r].
static void inplace(const float *w, float *c) {
    for (int s = 0; s < N / NJ; s++) {
        for (int k0 = 0; k0 < K; k0 += KC) {
            __m256 acc[NJ];
            const float *wr[NJ];
            for (int j = 0; j < NJ; j++) {
                acc[j] = _mm256_setzero_ps();
                wr[j] = w + (long)(s * NJ + j) * K + k0;
            }
            for (int k = 0; k < KC; k++) {
                if (k % 16 == 0 && k0 + KC < K)
                    for (int j = 0; j < NJ; j++)
                        _mm_prefetch((const char *)(wr[j] + KC + k), _MM_HINT_T1);
                __m256 a = _mm256_load_ps(a_half + (long)(k0 + k) * ROWS);
                for (int j = 0; j < NJ; j++)
                    acc[j] = _mm256_fmadd_ps(a, _mm256_set1_ps(wr[j][k]), acc[j]);
            }
            for (int j = 0; j < NJ; j++) {
                float *p = c + (s * NJ + j) * ROWS;
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc[j]));
            }
        }
    }
}

// The prepacked panel form: an 8 x 48 tile over the whole K per panel.
static void panels(const float *w, float *c) {
    for (int p = 0; p < N / NP; p++) {
        const float *wk = w + (long)p * K * NP;
        const float *ak = a_half;
        __m512 acc[ROWS][3];
        for (int r = 0; r < ROWS; r++)
            for (int v = 0; v < 3; v++) acc[r][v] = _mm512_setzero_ps();
        for (int k = 0; k < K; k++) {
            __m512 b0 = _mm512_load_ps(wk), b1 = _mm512_load_ps(wk + 16),
                   b2 = _mm512_load_ps(wk + 32);
            for (int r = 0; r < ROWS; r++) {
                __m512 x = _mm512_set1_ps(ak[r]);
                acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
            }
            ak += ROWS;
            wk += NP;
        }
        // Transposed into c[n][r] as the in-place form writes it.
        for (int r = 0; r < ROWS; r++)
            for (int v = 0; v < 3; v++) {
                float t[16];
                _mm512_storeu_ps(t, acc[r][v]);
                for (int l = 0; l < 16; l++) c[(p * NP + v * 16 + l) * ROWS + r] += t[l];
            }
    }
}

static void read_only(const float *w, int t) {
    __m512 s[8];
    for (int i = 0; i < 8; i++) s[i] = _mm512_setzero_ps();
    for (long i = 0; i < (long)N * K; i += 128)
        for (int u = 0; u < 8; u++) s[u] = _mm512_add_ps(s[u], _mm512_load_ps(w + i + 16 * u));
    for (int i = 1; i < 8; i++) s[0] = _mm512_add_ps(s[0], s[i]);
    sink[t] += _mm512_reduce_add_ps(s[0]);
}

static void *thread_main(void *arg) {
    long t = (long)arg;
    for (int e = (int)t; e < experts; e += 2) {
        long off = (long)e * N * K;
        if (mode == 0) read_only(w_rows + off, (int)t);
        else if (mode == 1) inplace(w_rows + off, c_out[t]);
        else panels(w_panels + off, c_out[t]);
    }
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 40;
    if (argc > 2) experts = atoi(argv[2]);
    if (rounds < 1 || experts < 2) return 2;
    long per = (long)N * K;
    w_rows = aligned_alloc(64, per * experts * 4);
    w_panels = aligned_alloc(64, per * experts * 4);
    a_half = aligned_alloc(64, (long)K * ROWS * 4);
    for (int t = 0; t < 2; t++) c_out[t] = aligned_alloc(64, N * ROWS * 4);
    if (!w_rows || !w_panels || !a_half || !c_out[0] || !c_out[1]) return 3;
    for (long i = 0; i < per * experts; i++) w_rows[i] = (float)((i * 7919) % 2001 - 1000) / 1000;
    for (long i = 0; i < (long)K * ROWS; i++) a_half[i] = (float)((i * 104729) % 1999 - 999) / 999;
    for (int e = 0; e < experts; e++)
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++)
                w_panels[(long)e * per + ((long)(n / NP) * K + k) * NP + n % NP] =
                    w_rows[(long)e * per + (long)n * K + k];
    // Check both forms on expert 0 against a double-precision sum.
    double worst[2] = {0, 0};
    for (int f = 0; f < 2; f++) {
        memset(c_out[0], 0, N * ROWS * 4);
        if (f == 0) inplace(w_rows, c_out[0]);
        else panels(w_panels, c_out[0]);
        for (int n = 0; n < N; n += 97)
            for (int r = 0; r < ROWS; r++) {
                double ref = 0, mag = 0;
                for (int k = 0; k < K; k++) {
                    double x = (double)w_rows[(long)n * K + k] * a_half[(long)k * ROWS + r];
                    ref += x;
                    mag += x < 0 ? -x : x;
                }
                double err = (c_out[0][n * ROWS + r] - ref) / mag;
                if (err < 0) err = -err;
                if (err > worst[f]) worst[f] = err;
            }
    }
    printf("check: in-place %.2e, panels %.2e (largest error over the sum of |products|)\n",
           worst[0], worst[1]);
    if (worst[0] > 1e-5 || worst[1] > 1e-5) return 1;
    double *gb = malloc(sizeof(double) * 3 * rounds);
    static const char *names[3] = {"read", "inplace", "panels"};
    for (int r = 0; r < rounds; r++) {
        for (mode = 0; mode < 3; mode++) {
            double t0 = now();
            pthread_t h[2];
            for (long t = 0; t < 2; t++) pthread_create(&h[t], 0, thread_main, (void *)t);
            for (int t = 0; t < 2; t++) pthread_join(h[t], 0);
            gb[r * 3 + mode] = (double)per * experts * 4 / (now() - t0) / 1e9;
            printf("%s %.1f GB/s (%.0f GFLOP/s)%s", names[mode], gb[r * 3 + mode],
                   4 * gb[r * 3 + mode], mode < 2 ? " | " : "\n");
        }
        fflush(stdout);
    }
    // Medians per band of the round's read-only rate.
    static const double bands[] = {0, 30, 40, 50, 1e9};
    for (int b = 0; b < 4; b++) {
        double v[3][rounds];
        int n = 0;
        for (int r = 0; r < rounds; r++)
            if (gb[r * 3] >= bands[b] && gb[r * 3] < bands[b + 1]) {
                for (int m = 0; m < 3; m++) v[m][n] = gb[r * 3 + m];
                n++;
            }
        if (!n) continue;
        double md[3];
        for (int m = 0; m < 3; m++) md[m] = median(v[m], n);
        printf("read-only %.0f-%.0f GB/s, %d rounds, medians: read %.1f, in-place %.1f (%.0f %%), "
               "panels %.1f (%.0f %%) GB/s\n",
               bands[b], b == 3 ? 999.0 : bands[b + 1], n, md[0], md[1], 100 * md[1] / md[0],
               md[2], 100 * md[2] / md[0]);
    }
    return 0;
}

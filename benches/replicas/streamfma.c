// The host's envelope for an expert GEMM that streams its weights: how many FLOP/s a kernel with
// no overhead at all can reach while reading f32 weights from memory, for R rows per expert.
// Not part of the build: a C program that isolates one pattern, to tell the host's limit from
// the kernel's.
//
//   gcc -O3 -march=native -pthread benches/replicas/streamfma.c -o /tmp/streamfma
//   /tmp/streamfma [rounds=5] [MiB per thread=256] [threads=2]
//
// Each thread walks its own part of a buffer far past the caches as 8 sequential streams in
// lockstep (8 weight rows, as moe-cpu's weight-broadcast kernel reads them in place), one
// 16-float vector of each per step, and does R fused multiply-adds per vector into 16
// accumulators, from registers only: the arithmetic of R rows per expert (each weight used by
// R rows: 2R FLOP per float, R 16-lane FMAs per 16 floats), with no row loads, no stores, no
// address arithmetic beyond the streams'. R = 0 is the plain read. Every round times each R
// once, in turn; the line per R gives the best and the median over the rounds of GB/s of
// weights and GFLOP/s. A kernel cannot pass this at the same R on the same host; the FMA peak
// (`examples/peaks`) is the other ceiling.
//
// Emerald Rapids guest (2 vCPUs, FMA peak 344-349 GFLOP/s), 2026-12-07, 2 threads, three runs of
// 5 rounds (best / median GFLOP/s, the plain read 26-31 GB/s best): R = 8 rows 94-100 / 83-95
// (27-29 % of the peak), R = 16 174-188 / 162-182 (50-54 %), R = 24 259-270 / 232-267, R = 32
// 298-303 / 268-293 (85-87 %), R = 64 305-321 / 291-316. Between two of those runs the layer's
// f32 expert GEMMs (`examples/ab_tuning`, 3 rounds): Qwen3 T=128 (8 rows per expert on average)
// 79 GFLOP/s, gpt-oss T=128 (16) 146, Mixtral T=128 (32) 248, DeepSeek-V3 T=128 (3-77) 209:
// 80-88 % of this envelope at the same rows; 70 % of the peak is 243 GFLOP/s, past the
// envelope at 8 and 16 rows on this host.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { S = 8, NRS = 8 };
static const int RS[NRS] = {0, 4, 8, 16, 24, 32, 64, 128};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float *buf;
static size_t per; // floats per thread
static int r_now;

typedef struct {
    int id;
    float sink;
} arg_t;

// R FMAs per loaded vector, unrolled so that the accumulators stay in registers.
#define STREAM(R)                                                                             \
    for (size_t k = 0; k < seg; k += 16) {                                                    \
        _Pragma("GCC unroll 8") for (int s = 0; s < S; s++) {                                 \
            __m512 w = _mm512_load_ps(b + s * seg + k);                                       \
            if (R == 0) {                                                                     \
                acc[s] = _mm512_add_ps(acc[s], w);                                            \
            } else {                                                                          \
                _Pragma("GCC unroll 128") for (int r = 0; r < R; r++) acc[(s + r) & 15] =     \
                    _mm512_fmadd_ps(w, x[r & 3], acc[(s + r) & 15]);                          \
            }                                                                                 \
        }                                                                                     \
    }

static void *work(void *p) {
    arg_t *a = p;
    const float *b = buf + per * a->id;
    size_t seg = per / S / 16 * 16;
    __m512 acc[16], x[4];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int i = 0; i < 4; i++) x[i] = _mm512_set1_ps(1e-3f * (i + 1));
    switch (r_now) {
    case 0: STREAM(0) break;
    case 4: STREAM(4) break;
    case 8: STREAM(8) break;
    case 16: STREAM(16) break;
    case 24: STREAM(24) break;
    case 32: STREAM(32) break;
    case 64: STREAM(64) break;
    case 128: STREAM(128) break;
    }
    __m512 t = acc[0];
    for (int i = 1; i < 16; i++) t = _mm512_add_ps(t, acc[i]);
    a->sink = _mm512_reduce_add_ps(t);
    return 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 5;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 256;
    int nt = argc > 3 ? atoi(argv[3]) : 2;
    if (rounds < 1 || rounds > 64 || nt < 1 || nt > 64 || mib < 1) return 2;
    per = mib << 18;
    buf = aligned_alloc(64, per * nt * sizeof(float));
    if (!buf) return 1;
    for (size_t i = 0; i < per * nt; i++) buf[i] = (float)(i & 7);
    double gbs[NRS][64];
    float sink = 0;
    for (int round = 0; round < rounds; round++) {
        for (int ri = 0; ri < NRS; ri++) {
            r_now = RS[ri];
            pthread_t th[64];
            arg_t a[64];
            double t0 = now();
            for (int i = 0; i < nt; i++) {
                a[i].id = i;
                pthread_create(&th[i], 0, work, &a[i]);
            }
            for (int i = 0; i < nt; i++) {
                pthread_join(th[i], 0);
                sink += a[i].sink;
            }
            gbs[ri][round] = (double)per * nt * 4 / (now() - t0) / 1e9;
        }
    }
    printf("%d threads, %zu MiB each, 8 streams per thread, %d rounds (checksum %g)\n", nt, mib,
           rounds, (double)sink);
    for (int ri = 0; ri < NRS; ri++) {
        qsort(gbs[ri], rounds, sizeof(double), cmp);
        double best = gbs[ri][rounds - 1], med = gbs[ri][rounds / 2];
        // 2R FLOP per float, 4 bytes per float.
        double f = RS[ri] / 2.0;
        printf("R=%3d rows: %5.1f GB/s best, %5.1f median; %6.1f GFLOP/s best, %6.1f median\n",
               RS[ri], best, med, best * f, med * f);
    }
    return 0;
}

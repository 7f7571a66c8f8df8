// Can one core stream memory-bound work while it does compute-bound work that streams its own
// weights? The evidence behind `Tuning::overlap_rows` (moe-cpu): few-rows expert items read
// their weights at the one core's limit (about 14 GB/s here) for almost no arithmetic, while
// the items of many rows use a fraction of it.
// Not part of the build: a C program that isolates one pattern.
//
//   gcc -O3 -march=native -pthread benches/replicas/overlap.c -o /tmp/overlap
//   /tmp/overlap [rounds=5] [MiB per thread of the compute stream=128] [ratio=3]
//
// Each of 2 threads owns a "big" buffer, read as 8 streams in lockstep with 32 FMAs per loaded
// 16-float vector from registers (32 rows per expert: compute-bound), and a "small" buffer of
// `ratio`/8 its size, read with one addition per vector (memory-bound). Three ways, each timed
// per round (best of the rounds): big alone, small alone, and both in one loop (`ratio` lines of
// the small buffer per step of the big one's 8, prefetched 2 KiB ahead, so that both end
// together). If the interleaved time is below the two alone summed, the core hid that much of
// the small work behind the big.
//
// Emerald Rapids guest (2 vCPUs), 2026-12-07, 5 rounds, 128 MiB per thread: ratio 3 (48 MiB
// small; the few-rows experts' bytes are about a third of the others' at DeepSeek-V3 f32 T=128)
// big alone 14.1-15.1 ms (284-305 GFLOP/s), small alone 3.3-3.8 ms (26-30 GB/s), interleaved
// 15.1-16.3 ms against 17.4-19.0 summed: 68 % of the small work hidden (two runs). Ratio 8
// (small as large as big): 21.6 ms against 22.9, 16 % hidden (the memory is then the limit).
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { S = 8 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float *big, *small;
static size_t per, sper;
static int mode, ratio;

typedef struct {
    int id;
    float sink;
} arg_t;

static void *work(void *p) {
    arg_t *a = p;
    const float *b = big + per * a->id;
    const float *q = small + sper * a->id;
    size_t seg = per / S / 16 * 16, qi = 0;
    __m512 acc[16], x[4], sacc = _mm512_setzero_ps();
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int i = 0; i < 4; i++) x[i] = _mm512_set1_ps(1e-3f * (i + 1));
    if (mode != 2) {
        for (size_t k = 0; k < seg; k += 16) {
            _Pragma("GCC unroll 8") for (int s = 0; s < S; s++) {
                __m512 w = _mm512_load_ps(b + s * seg + k);
                _Pragma("GCC unroll 32") for (int r = 0; r < 32; r++) acc[(s + r) & 15] =
                    _mm512_fmadd_ps(w, x[r & 3], acc[(s + r) & 15]);
            }
            // Interleaved: `ratio` lines of the small buffer per step, prefetched 2 KiB ahead.
            for (int u = 0; mode == 1 && u < ratio && qi < sper; u++, qi += 16) {
                _mm_prefetch((const char *)(q + qi) + 2048, _MM_HINT_T0);
                sacc = _mm512_add_ps(sacc, _mm512_load_ps(q + qi));
            }
        }
    }
    if (mode == 2) {
        for (; qi < sper; qi += 16) {
            _mm_prefetch((const char *)(q + qi) + 2048, _MM_HINT_T0);
            sacc = _mm512_add_ps(sacc, _mm512_load_ps(q + qi));
        }
    }
    __m512 t = sacc;
    for (int i = 0; i < 16; i++) t = _mm512_add_ps(t, acc[i]);
    a->sink = _mm512_reduce_add_ps(t);
    return 0;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 5;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 128;
    ratio = argc > 3 ? atoi(argv[3]) : 3;
    if (rounds < 1 || rounds > 64 || mib < 1 || ratio < 1 || ratio > 64) return 2;
    const int nt = 2;
    per = mib << 18;
    // `ratio` small lines per 8 big ones: both streams end together.
    sper = per * ratio / 8 / 16 * 16;
    big = aligned_alloc(64, per * nt * sizeof(float));
    small = aligned_alloc(64, sper * nt * sizeof(float));
    if (!big || !small) return 1;
    for (size_t i = 0; i < per * nt; i++) big[i] = (float)(i & 7);
    for (size_t i = 0; i < sper * nt; i++) small[i] = 1.0f;
    double best[3] = {1e9, 1e9, 1e9};
    float sink = 0;
    for (int r = 0; r < rounds; r++) {
        for (mode = 0; mode < 3; mode++) {
            pthread_t th[2];
            arg_t a[2];
            double t0 = now();
            for (int i = 0; i < nt; i++) {
                a[i].id = i;
                pthread_create(&th[i], 0, work, &a[i]);
            }
            for (int i = 0; i < nt; i++) {
                pthread_join(th[i], 0);
                sink += a[i].sink;
            }
            double t = now() - t0;
            if (t < best[mode]) best[mode] = t;
        }
    }
    printf("2 threads, %zu MiB big + %zu MiB small each, %d rounds (checksum %g)\n", mib,
           sper * 4 >> 20, rounds, (double)sink);
    printf("big alone (32 FMAs per vector): %.1f ms (%.1f GFLOP/s)\n", best[0] * 1e3,
           (double)per * nt * 64 / best[0] / 1e9);
    printf("small alone: %.1f ms (%.1f GB/s)\n", best[2] * 1e3,
           (double)sper * nt * 4 / best[2] / 1e9);
    printf("interleaved: %.1f ms, against %.1f summed: %.0f %% of the small work hidden\n",
           best[1] * 1e3, (best[0] + best[2]) * 1e3,
           100 * (best[0] + best[2] - best[1]) / best[2]);
    return 0;
}

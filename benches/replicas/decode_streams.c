// How fast this host reads weights as 1, 2, 4, 8 or 12 sequential streams per thread: the
// pattern of moe-cpu's bf16 decode kernel (moe-cpu/src/gemm/dpbf16.rs, `micro_seq`), which reads
// whole weight rows, `Tuning::seq_streams` of them at a time. Not part of the build: a C program
// that isolates one memory access pattern, to tell the host's limit from the kernel's.
//
//   gcc -O3 -march=native -pthread benches/replicas/decode_streams.c -o /tmp/decode_streams
//   /tmp/decode_streams [rounds=3] [row bytes=8192] [MiB per thread=512]
//
// Each thread reads its own buffer (far past the caches) as rows of `row bytes` (8 KiB: a bf16
// weight row of K = 4096, Mixtral's gate/up GEMM), S rows at a time: for each 256-byte step
// along the rows, 4 lines of each of the S rows, summed into one vector (loads only, no FMAs).
// With prefetch on, each line is also fetched into L2 4 KiB ahead (`prefetcht1`, as the kernel
// does); a stream that runs past the end of its row continues in the row it reads next, S rows
// on. Every round times each (threads, S, prefetch) once, in that order; one line each, GB/s.
//
// Emerald Rapids guest (2 vCPUs), 2026-12-07, two runs of three rounds (the first with a draft
// of this file, the same pattern), with prefetch, S = 1 / 4 / 8: 1 thread 13.9-15.1 / 15.3-16.7
// / 15.7-16.4 GB/s and 12.9-14.7 / 14.6-16.7 / 14.3-16.7; 2 threads 28.7-29.6 / 32.0-33.0 /
// 32.7-33.6 and 25.2-28.0 / 28.7-32.6 / 26.0-32.6 (4 streams over 1 in the same round of the
// second run: 1.14x, 1.19x, 1.09x). The decode kernel at one row at a time streamed its bf16
// weights at 27.6-28.3 GB/s (the `trace` timeline: both threads busy throughout), which
// `seq_streams = 4` lifted by 5-11 %.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { STEP = 256, AHEAD = 4096, MAXT = 2 };
static const int SS[] = {1, 2, 4, 8, 12};
static size_t row_bytes = 8192, bytes = (size_t)512 << 20;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef struct {
    const char *buf;
    int streams, prefetch;
    double seconds;
    long long sink;
} Job;

static void *read_rows(void *p) {
    Job *j = p;
    const int s_n = j->streams;
    const size_t group = row_bytes * s_n, groups = bytes / group;
    __m512i acc = _mm512_setzero_si512();
    double t0 = now();
    for (size_t g = 0; g < groups; g++) {
        const char *base = j->buf + g * group;
        for (size_t off = 0; off < row_bytes; off += STEP) {
            for (int s = 0; s < s_n; s++) {
                const char *row = base + s * row_bytes;
                if (j->prefetch) {
                    size_t at = off + AHEAD;
                    // Past the row's end: the same stream's next row, s_n rows on.
                    const char *q = at < row_bytes ? row + at : row + group + (at - row_bytes);
                    for (int l = 0; l < STEP; l += 64) _mm_prefetch(q + l, _MM_HINT_T1);
                }
                for (int l = 0; l < STEP; l += 64)
                    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(row + off + l));
            }
        }
    }
    j->seconds = now() - t0;
    j->sink = _mm512_reduce_add_epi64(acc);
    return NULL;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    if (argc > 2) row_bytes = (size_t)atol(argv[2]);
    if (argc > 3) bytes = (size_t)atol(argv[3]) << 20;
    if (row_bytes < STEP || row_bytes % STEP) {
        fprintf(stderr, "row bytes must be a positive multiple of %d\n", STEP);
        return 2;
    }
    // Room past the end for the last group's prefetches (they never fault, but stay inside).
    const size_t alloc = bytes + ((size_t)64 << 20);
    char *bufs[MAXT];
    for (int t = 0; t < MAXT; t++) {
        bufs[t] = aligned_alloc(4096, alloc);
        if (!bufs[t]) return 1;
        memset(bufs[t], 1, alloc);
    }
    long long sink = 0;
    for (int r = 0; r < rounds; r++)
        for (int nt = 1; nt <= MAXT; nt++)
            for (size_t si = 0; si < sizeof SS / sizeof SS[0]; si++)
                for (int pf = 0; pf < 2; pf++) {
                    pthread_t th[MAXT];
                    Job jobs[MAXT];
                    for (int t = 0; t < nt; t++) {
                        jobs[t] = (Job){bufs[t], SS[si], pf, 0.0, 0};
                        pthread_create(&th[t], NULL, read_rows, &jobs[t]);
                    }
                    double slowest = 0;
                    for (int t = 0; t < nt; t++) {
                        pthread_join(th[t], NULL);
                        if (jobs[t].seconds > slowest) slowest = jobs[t].seconds;
                        sink += jobs[t].sink;
                    }
                    size_t read = bytes / (row_bytes * SS[si]) * row_bytes * SS[si];
                    printf("round %d threads %d streams %2d prefetch %d: %5.1f GB/s\n", r, nt,
                           SS[si], pf, nt * read / slowest / 1e9);
                }
    printf("(checksum %lld)\n", sink);
    return 0;
}

/* The machine's FP32 FMA peak: every thread runs independent chains of vector FMAs, enough
 * of them to cover the FMA latency on every FMA port. Prints GFLOP/s.
 * With a third argument `bf16`, the same loop of AVX-512 BF16's vdpbf16ps instead (each adds
 * the products of 16 bfloat16 pairs into 16 float32 lanes: 64 flops); exit 2 where the
 * compiler was not told the CPU has it.
 * Build: cc -O3 -march=native -ffp-contract=fast -fopenmp fma_peak.c -o fma_peak
 * Run:   fma_peak [ITERATIONS [THREADS [fma|bf16]]] */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

typedef float vec __attribute__((vector_size(64)));
#define CHAINS 16

static float fma_loop(long iters, int thread) {
    vec acc[CHAINS], mul, add;
    for (int i = 0; i < 16; i++) {
        mul[i] = 0.9999f;
        add[i] = 1e-4f;
    }
    for (int c = 0; c < CHAINS; c++) acc[c] = add * (float)(c + thread);
    for (long n = 0; n < iters; n++) {
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = acc[c] * mul + add;
    }
    float sink = 0.0f;
    for (int c = 0; c < CHAINS; c++)
        for (int i = 0; i < 16; i++) sink += acc[c][i];
    return sink;
}

#ifdef __AVX512BF16__
static float bf16_loop(long iters, int thread) {
    __m512 acc[CHAINS];
    /* Small pairs, so the sums stay finite: bfloat16 1/256 in every half. */
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3B803B80);
    __m512bh b = (__m512bh)_mm512_set1_epi32(0x3B803B80 + thread);
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps(1e-4f * (float)c);
    for (long n = 0; n < iters; n++) {
#pragma GCC unroll 16
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    float sink = 0.0f;
    for (int c = 0; c < CHAINS; c++) sink += _mm512_reduce_add_ps(acc[c]);
    return sink;
}
#endif

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100000000L;
    int threads = argc > 2 ? atoi(argv[2]) : omp_get_max_threads();
    int bf16 = argc > 3 && strcmp(argv[3], "bf16") == 0;
#ifndef __AVX512BF16__
    if (bf16) {
        fprintf(stderr, "built without AVX-512 BF16 (-march=native on a CPU that lacks it)\n");
        return 2;
    }
#endif
    float sink = 0.0f;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
#ifdef __AVX512BF16__
        sink += bf16 ? bf16_loop(iters, omp_get_thread_num())
                     : fma_loop(iters, omp_get_thread_num());
#else
        sink += fma_loop(iters, omp_get_thread_num());
#endif
    }
    double seconds = omp_get_wtime() - start;
    double flop = (bf16 ? 4.0 : 2.0) * 16 * CHAINS * (double)iters * threads;
    printf("%.1f\n", flop / seconds / 1e9);
    return sink == 12345.0f; /* keep the result alive */
}

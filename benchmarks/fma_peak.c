/* The machine's FP32 FMA peak: every thread runs independent chains of vector FMAs, enough
 * of them to cover the FMA latency on every FMA port. Prints GFLOP/s.
 * Build: cc -O3 -march=native -ffp-contract=fast -fopenmp fma_peak.c -o fma_peak */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

typedef float vec __attribute__((vector_size(64)));
#define CHAINS 16

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100000000L;
    int threads = argc > 2 ? atoi(argv[2]) : omp_get_max_threads();
    float sink = 0.0f;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        vec acc[CHAINS], mul, add;
        for (int i = 0; i < 16; i++) {
            mul[i] = 0.9999f;
            add[i] = 1e-4f;
        }
        for (int c = 0; c < CHAINS; c++) acc[c] = add * (float)(c + omp_get_thread_num());
        for (long n = 0; n < iters; n++) {
#pragma GCC unroll 16
            for (int c = 0; c < CHAINS; c++) acc[c] = acc[c] * mul + add;
        }
        for (int c = 0; c < CHAINS; c++)
            for (int i = 0; i < 16; i++) sink += acc[c][i];
    }
    double seconds = omp_get_wtime() - start;
    double flop = 2.0 * 16 * CHAINS * (double)iters * threads;
    printf("%.1f\n", flop / seconds / 1e9);
    return sink == 12345.0f; /* keep the result alive */
}

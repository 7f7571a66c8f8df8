// L1-resident replica of the f32 register tile of moe-cpu's many-row AVX-512 kernels (the
// weight-broadcast and the broadcast kernel share it, operands swapped: see `tile`), against an
// FMA chain, K = 64 so that everything stays in L1. Five rounds, one thread, each round chain
// then tile back to back; prints GFLOP/s and a checksum.
//
//   gcc -O3 -march=native benches/replicas/l1tile.c -o /tmp/l1tile && /tmp/l1tile
//
// Emerald Rapids, 2026-12-06: chain 170.5-176.0, tile 162.9-171.5 GFLOP/s (95-98 % of the chain;
// first written as two copies of the loop, one per kernel, both timed: 162.9-171.5 and
// 166.1-170.7), where the layer's kernels reach 78-86 % with their data in L2.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define KC 64
// The 12 x 32 register tile: 2 vectors of `v` ([KC][32]) per k, 12 elements of `s` ([12][KC])
// broadcast, 24 accumulators. The weight-broadcast kernel runs it with the rows' tile as `v`
// and 12 weight rows as `s`, the broadcast kernel with a 32-column weight panel as `v` and 12
// activation rows as `s`: in L1 the two are the same instructions, timed once.
__attribute__((noinline)) void tile(const float*v,const float*s,float*C,long reps){
  for(long r=0;r<reps;r++){
    __m512 acc[12][2];
    for(int j=0;j<12;j++){acc[j][0]=_mm512_setzero_ps();acc[j][1]=_mm512_setzero_ps();}
    for(int k=0;k<KC;k++){
      __m512 v0=_mm512_load_ps(v+k*32),v1=_mm512_load_ps(v+k*32+16);
      #pragma GCC unroll 12
      for(int j=0;j<12;j++){__m512 b=_mm512_set1_ps(s[j*KC+k]);acc[j][0]=_mm512_fmadd_ps(v0,b,acc[j][0]);acc[j][1]=_mm512_fmadd_ps(v1,b,acc[j][1]);}
    }
    for(int j=0;j<12;j++){_mm512_store_ps(C+j*32,_mm512_add_ps(_mm512_load_ps(C+j*32),acc[j][0]));_mm512_store_ps(C+j*32+16,_mm512_add_ps(_mm512_load_ps(C+j*32+16),acc[j][1]));}
  }
}
__attribute__((noinline)) void chain(float*C,long reps){
  __m512 acc[24];for(int i=0;i<24;i++)acc[i]=_mm512_set1_ps(i*1e-3f);
  __m512 a=_mm512_set1_ps(0.999f),b=_mm512_set1_ps(1e-4f);
  for(long r=0;r<reps*KC;r++){
    #pragma GCC unroll 24
    for(int i=0;i<24;i++)acc[i]=_mm512_fmadd_ps(acc[i],a,b);
  }
  for(int i=0;i<24;i++)_mm512_store_ps(C+i*16,_mm512_add_ps(_mm512_load_ps(C+i*16),acc[i]));
}
int main(void){
  float*A=aligned_alloc(64,4*KC*32),*W=aligned_alloc(64,4*KC*32),*C=aligned_alloc(64,4*12*32);
  for(int i=0;i<KC*32;i++){A[i]=(i%7)*0.01f;W[i]=(i%5)*0.01f;}
  for(int i=0;i<12*32;i++)C[i]=0;
  long reps=200000; double fl=2.0*24*16*KC*reps;
  for(int round=0;round<5;round++){
    double t0=now();chain(C,reps);double t1=now();tile(A,W,C,reps);double t2=now();
    printf("chain %.1f  tile %.1f GFLOP/s\n",fl/(t1-t0)*1e-9,fl/(t2-t1)*1e-9);
  }
  printf("%f\n",C[5]);
}

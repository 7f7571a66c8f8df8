// L1-resident replica of the two f32 register tiles of moe-cpu's AVX-512 kernels, against an
// FMA chain: the weight-broadcast form (rows in the lanes: a [k][32] row tile, 12 weight rows
// broadcast, 24 accumulators) and the broadcast form (weights in the lanes: a [k][32] weight
// panel, 12 activation rows broadcast), K = 64 so that everything stays in L1. Five rounds, one
// thread, each round chain / wb / bc back to back; prints GFLOP/s and a checksum.
//
//   gcc -O3 -march=native benches/replicas/l1tile.c -o /tmp/l1tile && /tmp/l1tile
//
// Emerald Rapids, 2026-12-06: chain 170.5-176.0, wb 162.9-171.5, bc 166.1-170.7 GFLOP/s (95-98 %
// of the chain), where the layer's kernels reach 78-86 % with their data in L2.
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define KC 64
// wb form: A tile [KC][32], W 12 rows [12][KC] contiguous (no aliasing), in L1
__attribute__((noinline)) void wb(const float*A,const float*W,float*C,long reps){
  for(long r=0;r<reps;r++){
    __m512 acc[12][2];
    for(int j=0;j<12;j++){acc[j][0]=_mm512_setzero_ps();acc[j][1]=_mm512_setzero_ps();}
    for(int k=0;k<KC;k++){
      __m512 a0=_mm512_load_ps(A+k*32),a1=_mm512_load_ps(A+k*32+16);
      #pragma GCC unroll 12
      for(int j=0;j<12;j++){__m512 b=_mm512_set1_ps(W[j*KC+k]);acc[j][0]=_mm512_fmadd_ps(a0,b,acc[j][0]);acc[j][1]=_mm512_fmadd_ps(a1,b,acc[j][1]);}
    }
    for(int j=0;j<12;j++){_mm512_store_ps(C+j*32,_mm512_add_ps(_mm512_load_ps(C+j*32),acc[j][0]));_mm512_store_ps(C+j*32+16,_mm512_add_ps(_mm512_load_ps(C+j*32+16),acc[j][1]));}
  }
}
// bc form: W panel [KC][32] (2 vectors), A 12 rows broadcast
__attribute__((noinline)) void bc(const float*A,const float*W,float*C,long reps){
  for(long r=0;r<reps;r++){
    __m512 acc[12][2];
    for(int j=0;j<12;j++){acc[j][0]=_mm512_setzero_ps();acc[j][1]=_mm512_setzero_ps();}
    for(int k=0;k<KC;k++){
      __m512 w0=_mm512_load_ps(W+k*32),w1=_mm512_load_ps(W+k*32+16);
      #pragma GCC unroll 12
      for(int j=0;j<12;j++){__m512 b=_mm512_set1_ps(A[j*KC+k]);acc[j][0]=_mm512_fmadd_ps(w0,b,acc[j][0]);acc[j][1]=_mm512_fmadd_ps(w1,b,acc[j][1]);}
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
    double t0=now();chain(C,reps);double t1=now();wb(A,W,C,reps);double t2=now();bc(A,W,C,reps);double t3=now();
    printf("chain %.1f  wb %.1f  bc %.1f GFLOP/s\n",fl/(t1-t0)*1e-9,fl/(t2-t1)*1e-9,fl/(t3-t2)*1e-9);
  }
  printf("%f\n",C[5]);
}

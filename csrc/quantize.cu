// GPTQ kernels for exl2conv. Each has a named torch reference in exl2conv/ops.py (<name>_ref,
// listed in ops.REGISTRY) that defines the arithmetic; tests/gpu/test_kernels.py checks parity.
// Every float operation that the torch reference rounds separately is written with an explicit _rn
// intrinsic so that nvcc cannot fuse it into an FMA: the codes must come out as the reference
// computes them.

// Only the ATen core headers: torch/extension.h (all of libtorch's C++ API) would triple the
// first-use build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

#include "checks.h"

namespace {

constexpr int BLOCK_ROWS = 32;  // every EXL2 group boundary is a multiple of 32 rows
constexpr int THREADS = 128;

// One 32-row block of GPTQ for C candidates of one weight.
// w:      [C, K, N] f32, working weights (rows a..a+31 read)
// scale:  [C, N]    f32, the current group's effective scale per candidate
// zero:   [C, K]    i32, 2^(bits-1) of each row; maxq: [C, K] i32, 2^bits - 1
// u:      [K, K]    f32, upper Cholesky factor of the damped inverse Hessian (permuted order)
// q_out:  [C, K, N] f32, dequantized rows a..a+31 (written); may be w itself (the block's rows are
//         read into registers before any is written), hence no __restrict__ on either
// codes:  [C, K, N] i16 or null; err: [C, 32, N] f32, the block's scaled errors (written)
// One thread owns one column of one candidate and keeps the block's 32 rows in registers.
__global__ void gptq_block_kernel(const float* w, const float* __restrict__ scale,
                                  const int* __restrict__ zero, const int* __restrict__ maxq,
                                  const float* __restrict__ u, float* q_out,
                                  int16_t* __restrict__ codes, float* __restrict__ err,
                                  int K, int N, int a)
{
    __shared__ float us[BLOCK_ROWS][BLOCK_ROWS + 1];
    __shared__ int zs[BLOCK_ROWS], ms[BLOCK_ROWS];
    const int c = blockIdx.y;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    for (int t = threadIdx.x; t < BLOCK_ROWS * BLOCK_ROWS; t += blockDim.x)
        us[t / BLOCK_ROWS][t % BLOCK_ROWS] = u[(size_t)(a + t / BLOCK_ROWS) * K + a + t % BLOCK_ROWS];
    for (int t = threadIdx.x; t < BLOCK_ROWS; t += blockDim.x)
    {
        zs[t] = zero[(size_t)c * K + a + t];
        ms[t] = maxq[(size_t)c * K + a + t];
    }
    __syncthreads();
    if (n >= N) return;

    float r[BLOCK_ROWS];
    const float* wc = w + ((size_t)c * K + a) * N + n;
    #pragma unroll
    for (int i = 0; i < BLOCK_ROWS; i++) r[i] = wc[(size_t)i * N];
    const float s = scale[(size_t)c * N + n];
    const __half hs = __float2half_rn(s);

    #pragma unroll
    for (int i = 0; i < BLOCK_ROWS; i++)
    {
        const float z = (float) zs[i];
        const float x = r[i];
        float q = __fadd_rn(rintf(__fdiv_rn(x, s)), z);
        q = fminf(fmaxf(q, 0.0f), (float) ms[i]);
        const __half hq = __float2half_rn(__fsub_rn(q, z));
        const float qv = __half2float(__hmul(hq, hs));
        const float e = __fdiv_rn(__fsub_rn(x, qv), us[i][i]);
        const size_t o = ((size_t)c * K + a + i) * N + n;
        q_out[o] = qv;
        if (codes) codes[o] = (int16_t) q;
        err[((size_t)c * BLOCK_ROWS + i) * N + n] = e;
        #pragma unroll
        for (int j = i + 1; j < BLOCK_ROWS; j++) r[j] = __fsub_rn(r[j], __fmul_rn(us[i][j], e));
    }
}

// The p-grid scale search's error sums E_j = sum |clamp(rint(x / s_j)) * s_j - x|^3.5 with
// s_j = cand * p_j, for one group of each of B candidates: candidate c's group is rows
// a..a+rows[c]-1 of w[cidx[c]], quantized at bits[c]. One partial sum per (c, p, block of
// columns); the host adds the partials in a fixed order, so the result does not depend on
// scheduling, and a group's sums do not depend on the other groups of the batch.
// w: [C, K, N] f32; cidx, rows, bits: [B] i32; cand: [B, N] f32; p: [P] f32;
// partial: [B, P, gridDim.x] f32
__global__ void pgrid_err_many_kernel(const float* __restrict__ w, const int* __restrict__ cidx,
                                      const int* __restrict__ rows, const int* __restrict__ bits,
                                      const float* __restrict__ cand, const float* __restrict__ p,
                                      float* __restrict__ partial, int K, int N, int a)
{
    __shared__ float sh[THREADS];
    const int j = blockIdx.y;
    const int c = blockIdx.z;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = bits[c];
    const float lo = -(float) (1 << (b - 1));
    const float hi = (float) ((1 << b) - 1) + lo;
    float acc = 0.0f;
    if (n < N)
    {
        const float s = __fmul_rn(cand[(size_t)c * N + n], p[j]);
        const float* x = w + ((size_t)cidx[c] * K + a) * N + n;
        const int r = rows[c];
        for (int i = 0; i < r; i++)
        {
            const float xv = x[(size_t)i * N];
            float q = rintf(__fdiv_rn(xv, s));
            q = fminf(fmaxf(q, lo), hi);
            const float d = fabsf(__fsub_rn(__fmul_rn(q, s), xv));
            const float d3 = __fmul_rn(__fmul_rn(d, d), d);
            acc = __fadd_rn(acc, __fmul_rn(d3, __fsqrt_rn(d)));
        }
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int st = THREADS / 2; st > 0; st >>= 1)
    {
        if (threadIdx.x < st) sh[threadIdx.x] = __fadd_rn(sh[threadIdx.x], sh[threadIdx.x + st]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[((size_t)c * gridDim.y + j) * gridDim.x + blockIdx.x] = sh[0];
}

// One column's refinement: of q0 - 1, q0, q0 + 1 (within 1..16) the index with the least weighted
// squared rounding error over the group's r rows x[0], x[N], ... (q0 unless another is strictly better).
__device__ __forceinline__ int64_t refine_column(const float* __restrict__ x, int r, int N, const float* __restrict__ rw,
                                                 int64_t q0, __half qmax, float lo, float hi)
{
    const int64_t cand[3] = {q0, q0 > 1 ? q0 - 1 : 1, q0 < 16 ? q0 + 1 : 16};
    const __half inner = __hmul(qmax, __float2half_rn(0.00390625f));
    float s[3], e[3];
    #pragma unroll
    for (int k = 0; k < 3; k++)
    {
        s[k] = __half2float(__hmul(__float2half_rn((float) (cand[k] * cand[k])), inner));
        e[k] = 0.0f;
    }
    for (int i = 0; i < r; i++)
    {
        const float xv = x[(size_t)i * N];
        const float wt = rw[i];
        #pragma unroll
        for (int k = 0; k < 3; k++)
        {
            float q = rintf(__fdiv_rn(xv, s[k]));
            q = fminf(fmaxf(q, lo), hi);
            const float d = __fsub_rn(__fmul_rn(q, s[k]), xv);
            e[k] = __fadd_rn(e[k], __fmul_rn(wt, __fmul_rn(d, d)));
        }
    }
    int best = 0;
    if (e[1] < e[best]) best = 1;
    if (e[2] < e[best]) best = 2;
    return cand[best];
}

// The scale-index refinement (refine_qs in exl2conv/ops.py): for each column of one group of each
// of B candidates, of qs - 1, qs and qs + 1 (within 1..16) the index whose effective scale
// fp16(fp16(q^2) * fp16(qscale_max / 256)) rounds the group's rows with the least weighted squared
// error sum_i rw[i] (clamp(rint(x / s)) s - x)^2; qs itself unless another is strictly better.
// w: [C, K, N] f32; cidx, rows, bits: [B] i32; qs_in, qs_out: [B, N] i64; qmax: [B] f16;
// rw: [max(rows)] f32, the weights of rows a, a + 1, ...
__global__ void refine_qs_many_kernel(const float* __restrict__ w, const int* __restrict__ cidx,
                                      const int* __restrict__ rows, const int* __restrict__ bits,
                                      const int64_t* __restrict__ qs_in, const __half* __restrict__ qmax,
                                      const float* __restrict__ rw, int64_t* __restrict__ qs_out,
                                      int K, int N, int a)
{
    const int c = blockIdx.y;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int b = bits[c];
    const float lo = -(float) (1 << (b - 1));
    const float hi = (float) ((1 << b) - 1) + lo;
    qs_out[(size_t)c * N + n] = refine_column(w + ((size_t)cidx[c] * K + a) * N + n, rows[c], N, rw,
                                              qs_in[(size_t)c * N + n], qmax[c], lo, hi);
}

// The scale search before the p-grid (params_start_ref in exl2conv/ops.py), for one group of each
// of B candidates, in two kernels. First each column's base = (max_r |x| + 1e-12) / half_m[c],
// then per group s_max = max_n base and per column qs = clamp(rint(16 sqrt(base / s_max)), 1, 16),
// cand = (qs / 16)^2 s_max. w: [C, K, N] f32; cidx, rows: [B] i32; half_m: [B] f32;
// qs, cand: [B, N] f32 (cand holds base between the two); s_max: [B] f32.
__global__ void params_base_kernel(const float* __restrict__ w, const int* __restrict__ cidx,
                                   const int* __restrict__ rows, const float* __restrict__ half_m,
                                   float* __restrict__ base, int K, int N, int a)
{
    const int c = blockIdx.y;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* x = w + ((size_t)cidx[c] * K + a) * N + n;
    float m = 0.0f;
    for (int i = 0; i < rows[c]; i++) m = fmaxf(m, fabsf(x[(size_t)i * N]));
    base[(size_t)c * N + n] = __fdiv_rn(__fadd_rn(m, 1e-12f), half_m[c]);
}

constexpr int PARAM_THREADS = 1024;

__global__ void params_qs_kernel(float* __restrict__ cand, float* __restrict__ qs, float* __restrict__ s_max_out, int N)
{
    __shared__ float sh[PARAM_THREADS];
    const int c = blockIdx.x;
    float* base = cand + (size_t)c * N;  // read as base, overwritten with cand
    float m = 0.0f;
    for (int n = threadIdx.x; n < N; n += blockDim.x) m = fmaxf(m, base[n]);
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1)
    {
        if (threadIdx.x < st) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + st]);
        __syncthreads();
    }
    const float s_max = sh[0];
    if (threadIdx.x == 0) s_max_out[c] = s_max;
    for (int n = threadIdx.x; n < N; n += blockDim.x)
    {
        float q = rintf(__fmul_rn(16.0f, __fsqrt_rn(__fdiv_rn(base[n], s_max))));
        q = fminf(fmaxf(q, 1.0f), 16.0f);
        const float t = __fdiv_rn(q, 16.0f);
        qs[(size_t)c * N + n] = q;
        base[n] = __fmul_rn(__fmul_rn(t, t), s_max);
    }
}

// The scale search after the p-grid (params_finish_ref in exl2conv/ops.py): per group the first p
// with the least error, qscale_max = fp16(s_max * p), each column's index refined (refine_column),
// and the effective scales fp16(fp16(qs^2) * fp16(qscale_max / 256)) written to rows out_idx[c] of
// scale_out.
// err: [B, P] f32; grid: [P] f32; qs_f: [B, N] f32; s_max: [B] f32; rw: [max rows] f32;
// qs_out: [B, N] i64; qmax_out: [B] f16; scale_out: [C, N] f32.
__global__ void params_finish_kernel(const float* __restrict__ w, const int* __restrict__ cidx,
                                     const int* __restrict__ rows, const int* __restrict__ bits,
                                     const int* __restrict__ out_idx, const float* __restrict__ err,
                                     const float* __restrict__ grid, int P, const float* __restrict__ qs_f,
                                     const float* __restrict__ s_max, const float* __restrict__ rw,
                                     int64_t* __restrict__ qs_out, __half* __restrict__ qmax_out,
                                     float* __restrict__ scale_out, int K, int N, int a)
{
    const int c = blockIdx.y;
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    const float* e = err + (size_t)c * P;
    int best = 0;
    for (int j = 1; j < P; j++)
        if (e[j] < e[best]) best = j;
    const __half qmax = __float2half_rn(__fmul_rn(s_max[c], grid[best]));
    if (blockIdx.x == 0 && threadIdx.x == 0) qmax_out[c] = qmax;
    if (n >= N) return;
    const int b = bits[c];
    const float lo = -(float) (1 << (b - 1));
    const float hi = (float) ((1 << b) - 1) + lo;
    const int64_t q = refine_column(w + ((size_t)cidx[c] * K + a) * N + n, rows[c], N, rw,
                                    (int64_t) qs_f[(size_t)c * N + n], qmax, lo, hi);
    qs_out[(size_t)c * N + n] = q;
    const __half inner = __hmul(qmax, __float2half_rn(0.00390625f));
    scale_out[(size_t)out_idx[c] * N + n] = __half2float(__hmul(__float2half_rn((float) (q * q)), inner));
}


// Codes of a quantized weight from its dequantized values (codes_of_ref in exl2conv/ops.py):
// codes[r, n] = (s > 0 ? rint(q[r, n] / s) : 0) + zero[r] with s = scale[group[r], n].
// q: [K, N] f32; scale: [G, N] f16; group: [K] i64; zero: [K] i16; codes: [K, N] u8
__global__ void codes_of_kernel(const float* __restrict__ q, const __half* __restrict__ scale,
                                const int64_t* __restrict__ group, const int16_t* __restrict__ zero,
                                uint8_t* __restrict__ codes, int K, int N)
{
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)K * N) return;
    const size_t r = i / N, n = i % N;
    const float s = __half2float(scale[(size_t)group[r] * N + n]);
    const float c = s > 0.0f ? rintf(__fdiv_rn(q[i], s)) : 0.0f;
    codes[i] = (uint8_t) __fadd_rn(c, (float) zero[r]);
}

template <typename T> __device__ __forceinline__ float as_float(T x);
template <> __device__ __forceinline__ float as_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float as_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float as_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// A candidate's difference from the unquantized weight, as the measurement's corrected forwards
// take it (coded_delta_ref in exl2conv/ops.py): for output o and input k, with
// r = invperm[k] (the code row of input k),
//   outT[k, o] = bf16(float(fp16(fp16(codes[r, o] - zero[r]) * scale[group[r], o])) - float(base[o, k]))
// written as the [K, O] array whose transpose the torch path yields (same strides, so the
// forwards' matrix products see the same operands).
// codes: [K, N] u8 (permuted rows); zero: [K] i16; scale: [G, N] f16; group, invperm: [K] i64;
// base: [O, K] (f32, f16 or bf16); outT: [K, O] bf16. A 32 x 32 tile per block (32 x 8 threads):
// base is read along k and staged in shared memory, the codes and the output along o.
template <typename T>
__global__ void coded_delta_kernel(const uint8_t* __restrict__ codes, const int16_t* __restrict__ zero,
                                   const __half* __restrict__ scale, const int64_t* __restrict__ group,
                                   const int64_t* __restrict__ invperm, const T* __restrict__ base,
                                   __nv_bfloat16* __restrict__ outT, int K, int N, int O)
{
    __shared__ float tile[32][33];
    const int o0 = blockIdx.x * 32, k0 = blockIdx.y * 32;
    for (int j = threadIdx.y; j < 32; j += blockDim.y)
    {
        const int o = o0 + j, k = k0 + threadIdx.x;
        tile[j][threadIdx.x] = (o < O && k < K) ? as_float<T>(base[(size_t)o * K + k]) : 0.0f;
    }
    __syncthreads();
    for (int j = threadIdx.y; j < 32; j += blockDim.y)
    {
        const int k = k0 + j, o = o0 + threadIdx.x;
        if (k >= K || o >= O) continue;
        const int64_t r = invperm[k];
        const __half q = __float2half_rn((float) ((int) codes[(size_t)r * N + o] - (int) zero[r]));
        const __half d = __hmul(q, scale[(size_t)group[r] * N + o]);
        outT[(size_t)k * O + o] = __float2bfloat16_rn(__fsub_rn(__half2float(d), tile[threadIdx.x][j]));
    }
}

}  // namespace

void gptq_block(at::Tensor w, at::Tensor scale, at::Tensor zero, at::Tensor maxq, at::Tensor u,
                at::Tensor q_out, at::Tensor codes, at::Tensor err, int64_t a)
{
    const c10::cuda::OptionalCUDAGuard guard(w.device());
    CHECK_CUDA_F32(w, 3); CHECK_CUDA_F32(scale, 2); CHECK_CUDA_F32(u, 2); CHECK_CUDA_F32(q_out, 3); CHECK_CUDA_F32(err, 3);
    CHECK_CUDA_DTYPE(zero, at::kInt, 2); CHECK_CUDA_DTYPE(maxq, at::kInt, 2);
    const int C = w.size(0), K = w.size(1), N = w.size(2);
    TORCH_CHECK(a >= 0 && a + BLOCK_ROWS <= K, "gptq_block: rows ", a, "..", a + BLOCK_ROWS, " outside K=", K);
    TORCH_CHECK(scale.size(0) == C && scale.size(1) == N, "gptq_block: scale must be [C, N]");
    TORCH_CHECK(zero.size(0) == C && zero.size(1) == K && maxq.size(0) == C && maxq.size(1) == K, "gptq_block: zero/maxq must be [C, K]");
    TORCH_CHECK(u.size(0) == K && u.size(1) == K, "gptq_block: u must be [K, K]");
    TORCH_CHECK(err.size(0) == C && err.size(1) == BLOCK_ROWS && err.size(2) == N, "gptq_block: err must be [C, 32, N]");
    TORCH_CHECK(q_out.sizes() == w.sizes(), "gptq_block: q_out must be shaped like w");
    int16_t* codes_ptr = nullptr;
    if (codes.numel())
    {
        CHECK_CUDA_DTYPE(codes, at::kShort, 3);
        TORCH_CHECK(codes.sizes() == w.sizes(), "gptq_block: codes must be shaped like w");
        codes_ptr = codes.data_ptr<int16_t>();
    }
    dim3 grid((N + THREADS - 1) / THREADS, C);
    gptq_block_kernel<<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), scale.data_ptr<float>(), zero.data_ptr<int>(), maxq.data_ptr<int>(), u.data_ptr<float>(),
        q_out.data_ptr<float>(), codes_ptr, err.data_ptr<float>(), K, N, (int) a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pgrid_err_many(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor cand,
                          at::Tensor p, int64_t a)
{
    const c10::cuda::OptionalCUDAGuard guard(w.device());
    CHECK_CUDA_F32(w, 3); CHECK_CUDA_F32(cand, 2); CHECK_CUDA_F32(p, 1);
    CHECK_CUDA_DTYPE(cidx, at::kInt, 1); CHECK_CUDA_DTYPE(rows, at::kInt, 1); CHECK_CUDA_DTYPE(bits, at::kInt, 1);
    const int K = w.size(1), N = w.size(2), P = p.size(0), B = cidx.size(0);
    TORCH_CHECK(rows.size(0) == B && bits.size(0) == B && cand.size(0) == B && cand.size(1) == N,
                "pgrid_err_many: cidx, rows, bits must be [B] and cand [B, N]");
    TORCH_CHECK(a >= 0 && a < K, "pgrid_err_many: start row ", a, " outside K=", K);
    const int nblk = (N + THREADS - 1) / THREADS;
    auto partial = at::empty({B, P, nblk}, w.options());
    dim3 grid(nblk, P, B);
    pgrid_err_many_kernel<<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), cidx.data_ptr<int>(), rows.data_ptr<int>(), bits.data_ptr<int>(), cand.data_ptr<float>(),
        p.data_ptr<float>(), partial.data_ptr<float>(), K, N, (int) a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partial;  // [B, P, nblk]
}

at::Tensor refine_qs_many(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor qs,
                          at::Tensor qmax, at::Tensor rw, int64_t a)
{
    const c10::cuda::OptionalCUDAGuard guard(w.device());
    CHECK_CUDA_F32(w, 3); CHECK_CUDA_F32(rw, 1);
    CHECK_CUDA_DTYPE(cidx, at::kInt, 1); CHECK_CUDA_DTYPE(rows, at::kInt, 1); CHECK_CUDA_DTYPE(bits, at::kInt, 1);
    CHECK_CUDA_DTYPE(qs, at::kLong, 2); CHECK_CUDA_DTYPE(qmax, at::kHalf, 1);
    const int K = w.size(1), N = w.size(2), B = cidx.size(0);
    TORCH_CHECK(rows.size(0) == B && bits.size(0) == B && qmax.size(0) == B && qs.size(0) == B && qs.size(1) == N,
                "refine_qs_many: cidx, rows, bits, qmax must be [B] and qs [B, N]");
    TORCH_CHECK(a >= 0 && a < K, "refine_qs_many: start row ", a, " outside K=", K);
    // rw must hold the weights of every group's rows (not checked here: rows live on the device)
    auto out = at::empty({B, N}, qs.options());
    dim3 grid((N + THREADS - 1) / THREADS, B);
    refine_qs_many_kernel<<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), cidx.data_ptr<int>(), rows.data_ptr<int>(), bits.data_ptr<int>(), qs.data_ptr<int64_t>(),
        reinterpret_cast<const __half*>(qmax.data_ptr<at::Half>()), rw.data_ptr<float>(), out.data_ptr<int64_t>(),
        K, N, (int) a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

void codes_of(at::Tensor q, at::Tensor scale, at::Tensor group, at::Tensor zero, at::Tensor codes)
{
    const c10::cuda::OptionalCUDAGuard guard(q.device());
    CHECK_CUDA_F32(q, 2); CHECK_CUDA_DTYPE(scale, at::kHalf, 2); CHECK_CUDA_DTYPE(group, at::kLong, 1);
    CHECK_CUDA_DTYPE(zero, at::kShort, 1); CHECK_CUDA_DTYPE(codes, at::kByte, 2);
    const int K = q.size(0), N = q.size(1);
    TORCH_CHECK(scale.size(1) == N && group.size(0) == K && zero.size(0) == K && codes.sizes() == q.sizes(),
                "codes_of: scale must be [G, N], group and zero [K], codes shaped like q [K, N]");
    if (K == 0 || N == 0) return;
    const unsigned grid = (unsigned) (((size_t)K * N + THREADS - 1) / THREADS);
    codes_of_kernel<<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<float>(), reinterpret_cast<const __half*>(scale.data_ptr<at::Half>()), group.data_ptr<int64_t>(),
        zero.data_ptr<int16_t>(), codes.data_ptr<uint8_t>(), K, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor coded_delta(at::Tensor codes, at::Tensor zero, at::Tensor scale, at::Tensor group, at::Tensor invperm,
                       at::Tensor base)
{
    const c10::cuda::OptionalCUDAGuard guard(codes.device());
    CHECK_CUDA_DTYPE(codes, at::kByte, 2); CHECK_CUDA_DTYPE(zero, at::kShort, 1); CHECK_CUDA_DTYPE(scale, at::kHalf, 2);
    CHECK_CUDA_DTYPE(group, at::kLong, 1); CHECK_CUDA_DTYPE(invperm, at::kLong, 1);
    TORCH_CHECK(base.is_cuda() && base.dim() == 2 && base.is_contiguous(), "coded_delta: base must be a contiguous [O, K] CUDA tensor");
    const int K = codes.size(0), N = codes.size(1), O = base.size(0);
    TORCH_CHECK(base.size(1) == K && O <= N && scale.size(1) == N && zero.size(0) == K && group.size(0) == K &&
                invperm.size(0) == K, "coded_delta: codes [K, N], base [O <= N, K], scale [G, N], zero/group/invperm [K]");
    auto outT = at::empty({K, O}, codes.options().dtype(at::kBFloat16));
    if (K == 0 || O == 0) return outT.t();
    dim3 grid((O + 31) / 32, (K + 31) / 32), block(32, 8);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const uint8_t* c = codes.data_ptr<uint8_t>();
    const int16_t* z = zero.data_ptr<int16_t>();
    const __half* s = reinterpret_cast<const __half*>(scale.data_ptr<at::Half>());
    const int64_t* g = group.data_ptr<int64_t>();
    const int64_t* ip = invperm.data_ptr<int64_t>();
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(outT.data_ptr<at::BFloat16>());
    switch (base.scalar_type())
    {
    case at::kFloat:
        coded_delta_kernel<float><<<grid, block, 0, stream>>>(c, z, s, g, ip, base.data_ptr<float>(), out, K, N, O);
        break;
    case at::kHalf:
        coded_delta_kernel<__half><<<grid, block, 0, stream>>>(
            c, z, s, g, ip, reinterpret_cast<const __half*>(base.data_ptr<at::Half>()), out, K, N, O);
        break;
    case at::kBFloat16:
        coded_delta_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
            c, z, s, g, ip, reinterpret_cast<const __nv_bfloat16*>(base.data_ptr<at::BFloat16>()), out, K, N, O);
        break;
    default:
        TORCH_CHECK(false, "coded_delta: base has dtype ", base.scalar_type(), ", expected float32, float16 or bfloat16");
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return outT.t();  // [O, K] with strides (1, O)
}

std::vector<at::Tensor> params_start(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor half_m, int64_t a)
{
    const c10::cuda::OptionalCUDAGuard guard(w.device());
    CHECK_CUDA_F32(w, 3); CHECK_CUDA_F32(half_m, 1);
    CHECK_CUDA_DTYPE(cidx, at::kInt, 1); CHECK_CUDA_DTYPE(rows, at::kInt, 1);
    const int K = w.size(1), N = w.size(2), B = cidx.size(0);
    TORCH_CHECK(rows.size(0) == B && half_m.size(0) == B, "params_start: cidx, rows, half_m must be [B]");
    TORCH_CHECK(a >= 0 && a < K, "params_start: start row ", a, " outside K=", K);
    auto qs = at::empty({B, N}, w.options()), cand = at::empty({B, N}, w.options()), s_max = at::empty({B}, w.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    params_base_kernel<<<dim3((N + THREADS - 1) / THREADS, B), THREADS, 0, stream>>>(
        w.data_ptr<float>(), cidx.data_ptr<int>(), rows.data_ptr<int>(), half_m.data_ptr<float>(), cand.data_ptr<float>(),
        K, N, (int) a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    params_qs_kernel<<<B, PARAM_THREADS, 0, stream>>>(cand.data_ptr<float>(), qs.data_ptr<float>(), s_max.data_ptr<float>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {qs, cand, s_max};
}

std::vector<at::Tensor> params_finish(at::Tensor w, at::Tensor cidx, at::Tensor rows, at::Tensor bits, at::Tensor out_idx,
                                      at::Tensor err, at::Tensor grid, at::Tensor qs, at::Tensor s_max, at::Tensor rw,
                                      at::Tensor scale_out, int64_t a)
{
    const c10::cuda::OptionalCUDAGuard guard(w.device());
    CHECK_CUDA_F32(w, 3); CHECK_CUDA_F32(err, 2); CHECK_CUDA_F32(grid, 1); CHECK_CUDA_F32(qs, 2); CHECK_CUDA_F32(s_max, 1);
    CHECK_CUDA_F32(rw, 1); CHECK_CUDA_F32(scale_out, 2);
    CHECK_CUDA_DTYPE(cidx, at::kInt, 1); CHECK_CUDA_DTYPE(rows, at::kInt, 1); CHECK_CUDA_DTYPE(bits, at::kInt, 1);
    CHECK_CUDA_DTYPE(out_idx, at::kInt, 1);
    const int K = w.size(1), N = w.size(2), B = cidx.size(0), P = grid.size(0);
    TORCH_CHECK(rows.size(0) == B && bits.size(0) == B && out_idx.size(0) == B && s_max.size(0) == B &&
                err.size(0) == B && err.size(1) == P && qs.size(0) == B && qs.size(1) == N && scale_out.size(1) == N,
                "params_finish: cidx, rows, bits, out_idx, s_max [B]; err [B, P]; qs [B, N]; scale_out [C, N]");
    TORCH_CHECK(a >= 0 && a < K, "params_finish: start row ", a, " outside K=", K);
    auto qs_out = at::empty({B, N}, w.options().dtype(at::kLong));
    auto qmax = at::empty({B}, w.options().dtype(at::kHalf));
    params_finish_kernel<<<dim3((N + THREADS - 1) / THREADS, B), THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<float>(), cidx.data_ptr<int>(), rows.data_ptr<int>(), bits.data_ptr<int>(), out_idx.data_ptr<int>(),
        err.data_ptr<float>(), grid.data_ptr<float>(), P, qs.data_ptr<float>(), s_max.data_ptr<float>(), rw.data_ptr<float>(),
        qs_out.data_ptr<int64_t>(), reinterpret_cast<__half*>(qmax.data_ptr<at::Half>()), scale_out.data_ptr<float>(),
        K, N, (int) a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {qs_out, qmax};
}

/*
 * CUDA half of the kernel library: the kernels are thin wrappers that run the block programs of
 * tokenMergeSteps.h and tokenMergeSalience.h with a device executor, and atm_token_merge_enqueue
 * launches them.
 *
 * Launches per merge step (all on the caller's stream, no host synchronisation):
 *   [split_kernel]      only for split_mode = size          grid (ceil(M/256), B)
 *   [salience_kernel]   only for weighting = salience: rows grid (ceil(M/32), B)
 *   [salience_kernel]   ... columns                         grid (ceil(M/32), B)
 *   [normalize_kernel]  ... min-max normalisation           grid (B)
 *   match_kernel        similarity + best partner + count   grid (ceil(Na/32), B), none when Na = 0
 *   plan_kernel         r, ranking, row plan, size_out, K   grid (B)
 *   merge_kernel        gather / weighted average, x_out    grid (ceil(N/8), B)
 * Work: O(B Na Nb D) for the similarity, O(B M^2 D) for the salience (two passes), O(B Na^2) for
 * the ranking, O(B N C) for the merge.
 */
#include "tokenMergeInternal.h"

#include <string>

namespace atm
{
namespace
{

//! One block's phases on the GPU: a barrier, then this thread's share of the phase.
template <class State>
struct DeviceExec
{
    State state;

    template <class F>
    __device__ void each(F&& f)
    {
        __syncthreads();
        f(static_cast<int>(threadIdx.x), state);
    }
};

__global__ void __launch_bounds__(steps::kBlockThreads) splitKernel(steps::SplitArgs args)
{
    extern __shared__ float sizes[];
    DeviceExec<steps::NoState> ex;
    steps::splitBlock(ex, sizes, args, blockIdx.y, blockIdx.x);
}

template <typename T, steps::SaliencePass kPass>
__global__ void __launch_bounds__(steps::kBlockThreads) salienceKernel(steps::SalienceArgs args)
{
    __shared__ steps::SalienceShared sh;
    DeviceExec<steps::SalienceThread> ex;
    steps::salienceBlock<T, kPass>(ex, sh, args, blockIdx.y, blockIdx.x);
}

__global__ void __launch_bounds__(steps::kBlockThreads) normalizeKernel(steps::SalienceArgs args)
{
    __shared__ steps::NormalizeShared sh;
    DeviceExec<steps::NoState> ex;
    steps::salienceNormalizeBlock(ex, sh, args, blockIdx.x);
}

template <typename T>
__global__ void __launch_bounds__(steps::kBlockThreads) matchKernel(steps::MatchArgs args)
{
    __shared__ steps::MatchShared sh;
    DeviceExec<steps::MatchThread> ex;
    steps::matchBlock<T>(ex, sh, args, blockIdx.y, blockIdx.x);
}

__global__ void __launch_bounds__(steps::kBlockThreads) planKernel(steps::PlanArgs args)
{
    extern __shared__ __align__(16) unsigned char planSmem[];
    DeviceExec<steps::NoState> ex;
    steps::planBlock(ex, planSmem, args, blockIdx.x);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(steps::kBlockThreads) mergeKernel(steps::MergeArgs args)
{
    int const warp = threadIdx.x / steps::kWarpSize;
    int const lane = threadIdx.x % steps::kWarpSize;
    steps::mergeLane<T, VEC>(args, blockIdx.y, static_cast<int64_t>(blockIdx.x) * steps::kMergeRowsPerBlock + warp, lane);
}

template <typename T>
void launchAll(detail::Problem const& p, detail::Scratch const& s, void const* x, float const* size,
    void const* metric, void* xOut, float* sizeOut, int64_t* numTokensOut, cudaStream_t stream)
{
    dim3 const block(steps::kBlockThreads);
    unsigned const batch = static_cast<unsigned>(p.batch);
    if (p.splitMode == ATM_SPLIT_SIZE)
    {
        dim3 const grid((p.unprotected + steps::kBlockThreads - 1) / steps::kBlockThreads, batch);
        splitKernel<<<grid, block, p.unprotected * sizeof(float), stream>>>(detail::splitArgs(p, s, size));
    }
    if (p.salience)
    {
        steps::SalienceArgs const args = detail::salienceArgs(p, s, metric);
        dim3 const grid(static_cast<unsigned>(detail::salienceTiles(p)), batch);
        salienceKernel<T, steps::SaliencePass::kRows><<<grid, block, 0, stream>>>(args);
        salienceKernel<T, steps::SaliencePass::kColumns><<<grid, block, 0, stream>>>(args);
        normalizeKernel<<<dim3(batch), block, 0, stream>>>(args);
    }
    // Na = 0 (P odd, N - P = 1): a grid dimension of 0 is a launch error, and there is nothing to
    // match; plan_kernel still writes r = 0 (no tile counts to sum) and the reordered output.
    if (p.tilesA > 0)
    {
        matchKernel<T><<<dim3(p.tilesA, batch), block, 0, stream>>>(detail::matchArgs(p, s, metric));
    }
    planKernel<<<dim3(batch), block, steps::planSharedBytes(p.na), stream>>>(
        detail::planArgs(p, s, size, sizeOut, numTokensOut));
    dim3 const mergeGrid(
        static_cast<unsigned>((p.numTokens + steps::kMergeRowsPerBlock - 1) / steps::kMergeRowsPerBlock), batch);
    steps::MergeArgs const args = detail::mergeArgs(p, s, x, size, xOut, sizeOut, numTokensOut);
    if (detail::vectorWidth(p, x, xOut) == 1)
    {
        mergeKernel<T, 1><<<mergeGrid, block, 0, stream>>>(args);
    }
    else
    {
        mergeKernel<T, 16 / sizeof(T)><<<mergeGrid, block, 0, stream>>>(args);
    }
}

} // namespace
} // namespace atm

extern "C" int atm_token_merge_enqueue(atm_token_merge_params const* params, void const* x, float const* size,
    void const* metric, void* x_out, float* size_out, int64_t* num_tokens_out, void* workspace,
    size_t workspace_bytes, cudaStream_t stream)
{
    using atm::detail::fail;
    atm::detail::Problem p;
    int const status = atm::detail::describe(params, &p);
    if (status != ATM_STATUS_OK)
    {
        return status;
    }
    if (x == nullptr || size == nullptr || metric == nullptr || x_out == nullptr || size_out == nullptr
        || num_tokens_out == nullptr || workspace == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "a tensor or workspace pointer is NULL");
    }
    atm::detail::WorkspaceLayout const layout = atm::detail::layoutFor(p);
    if (workspace_bytes < layout.total)
    {
        return fail(ATM_STATUS_WORKSPACE_TOO_SMALL,
            "workspace has " + std::to_string(workspace_bytes) + " bytes, needs " + std::to_string(layout.total));
    }
    if (reinterpret_cast<uintptr_t>(workspace) % alignof(int64_t) != 0)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "workspace must be 8-byte aligned");
    }
    atm::detail::Scratch const s = atm::detail::carve(workspace, layout, p);
    switch (p.dtype)
    {
    case ATM_DTYPE_FLOAT32:
        atm::launchAll<float>(p, s, x, size, metric, x_out, size_out, num_tokens_out, stream);
        break;
    case ATM_DTYPE_FLOAT16:
        atm::launchAll<__half>(p, s, x, size, metric, x_out, size_out, num_tokens_out, stream);
        break;
    default: atm::launchAll<__nv_bfloat16>(p, s, x, size, metric, x_out, size_out, num_tokens_out, stream);
    }
    cudaError_t const error = cudaGetLastError();
    if (error != cudaSuccess)
    {
        return fail(ATM_STATUS_CUDA_ERROR,
            std::string("kernel launch failed: ") + cudaGetErrorName(error) + ": " + cudaGetErrorString(error));
    }
    return ATM_STATUS_OK;
}

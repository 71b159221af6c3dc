/*
 * Host half of the kernel library: parameter checks, workspace layout, error reporting, and the
 * CPU executor that runs the kernels' block programs (tokenMergeSteps.h) in loops.
 */
#include "tokenMergeInternal.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <new>
#include <sstream>
#include <vector>

namespace atm
{
namespace detail
{
namespace
{

thread_local std::string tLastError;

size_t alignUp(size_t bytes)
{
    constexpr size_t kAlign = 256;
    return (bytes + kAlign - 1) / kAlign * kAlign;
}

std::string checkParams(atm_token_merge_params const& p)
{
    std::ostringstream msg;
    if (p.batch < 1 || p.batch > ATM_TOKEN_MERGE_MAX_BATCH)
    {
        msg << "batch must be in [1, " << ATM_TOKEN_MERGE_MAX_BATCH << "], got " << p.batch;
    }
    else if (p.channels < 1 || p.metric_dim < 1)
    {
        msg << "channels and metric_dim must be >= 1, got " << p.channels << " and " << p.metric_dim;
    }
    else if (p.num_protected < 0)
    {
        msg << "num_protected must be >= 0, got " << p.num_protected;
    }
    else if (p.num_tokens - p.num_protected < 1)
    {
        msg << "num_tokens (" << p.num_tokens << ") must exceed num_protected (" << p.num_protected << ")";
    }
    else if (p.num_tokens - p.num_protected > ATM_TOKEN_MERGE_MAX_UNPROTECTED)
    {
        msg << "num_tokens - num_protected = " << p.num_tokens - p.num_protected << " exceeds the kernels' limit of "
            << ATM_TOKEN_MERGE_MAX_UNPROTECTED;
    }
    else if (p.split_mode != ATM_SPLIT_ALTERNATE && p.split_mode != ATM_SPLIT_SIZE)
    {
        msg << "split_mode must be 0 (alternate) or 1 (size), got " << p.split_mode;
    }
    else if (p.dtype != ATM_DTYPE_FLOAT32 && p.dtype != ATM_DTYPE_FLOAT16 && p.dtype != ATM_DTYPE_BFLOAT16)
    {
        msg << "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " << p.dtype;
    }
    else if (p.weighting != ATM_WEIGHTING_SIZE && p.weighting != ATM_WEIGHTING_SALIENCE)
    {
        msg << "weighting must be 0 (size) or 1 (salience), got " << p.weighting;
    }
    else if (p.weighting == ATM_WEIGHTING_SALIENCE && !(std::isfinite(p.salience_temperature) && p.salience_temperature > 0))
    {
        msg << "salience_temperature must be > 0, got " << p.salience_temperature;
    }
    else if (p.r_max < -1)
    {
        msg << "r_max must be >= -1, got " << p.r_max;
    }
    else if (p.fixed_r < 0 && p.r_max >= 0 && !(std::isfinite(p.redundancy_std) && p.redundancy_std > 0))
    {
        msg << "redundancy_std must be > 0, got " << p.redundancy_std;
    }
    else if (p.fixed_r < 0 && p.r_max >= 0 && !(std::isfinite(p.redundancy_mean) && std::isfinite(p.redundancy_scale)))
    {
        msg << "redundancy_mean and redundancy_scale must be finite, got " << p.redundancy_mean << " and "
            << p.redundancy_scale;
    }
    else if (p.fixed_r < 0 && p.r_max < 0 && std::isnan(p.threshold))
    {
        msg << "threshold is NaN (and fixed_r < 0 asks for the threshold)";
    }
    return msg.str();
}

} // namespace

int fail(int status, std::string const& message)
{
    tLastError = message;
    return status;
}

int describe(atm_token_merge_params const* params, Problem* problem)
{
    if (params == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "params is NULL");
    }
    std::string const error = checkParams(*params);
    if (!error.empty())
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, error);
    }
    Problem& p = *problem;
    p.batch = params->batch;
    p.numTokens = params->num_tokens;
    p.channels = params->channels;
    p.dim = params->metric_dim;
    p.numProtected = params->num_protected;
    p.unprotected = static_cast<int32_t>(params->num_tokens - params->num_protected);
    p.splitMode = params->split_mode;
    bool const alternate = p.splitMode == ATM_SPLIT_ALTERNATE;
    steps::SplitShape const split = steps::splitShape(p.numProtected, p.unprotected, alternate);
    p.na = split.na;
    p.nb = split.nb;
    p.firstA = split.firstA;
    p.firstB = split.firstB;
    p.tilesA = (p.na + steps::kTile - 1) / steps::kTile;
    p.rule.fixedR = params->fixed_r;
    p.rule.rMax = params->r_max;
    p.rule.mean = params->redundancy_mean;
    p.rule.stdDev = params->redundancy_std;
    p.rule.scale = params->redundancy_scale;
    p.threshold = params->threshold;
    p.dtype = params->dtype;
    p.salience = params->weighting == ATM_WEIGHTING_SALIENCE;
    p.temperature = params->salience_temperature;
    return ATM_STATUS_OK;
}

WorkspaceLayout layoutFor(Problem const& p)
{
    auto const ints = [](int64_t count) { return alignUp(static_cast<size_t>(count) * sizeof(int32_t)); };
    auto const floats = [](int64_t count) { return alignUp(static_cast<size_t>(count) * sizeof(float)); };
    WorkspaceLayout l{};
    size_t at = 0;
    l.order = at;
    at += p.splitMode == ATM_SPLIT_SIZE ? ints(p.batch * p.unprotected) : 0;
    l.score = at;
    at += alignUp(static_cast<size_t>(p.batch * p.na) * sizeof(float));
    l.dst = at;
    at += ints(p.batch * p.na);
    l.tileCount = at;
    at += ints(p.batch * p.tilesA);
    l.plan = at;
    at += ints(p.batch * p.numTokens);
    l.srcOffset = at;
    at += ints(p.batch * (p.nb + 1));
    l.srcList = at;
    at += ints(p.batch * p.na);
    // AdaMerge: the salience passes' arrays and the merged weights (weighting = salience), the
    // tiles' score sums (intensity rule). Nothing for ATM's steps.
    int64_t const salienceTokens = p.salience ? p.batch * p.unprotected : 0;
    l.rowMax = at;
    at += floats(salienceTokens);
    l.rowSum = at;
    at += floats(salienceTokens);
    l.salience = at;
    at += floats(salienceTokens);
    l.mergedWeight = at;
    at += floats(p.salience ? p.batch * p.nb : 0);
    l.tileScore = at;
    at += floats(p.intensity() ? p.batch * p.tilesA : 0);
    l.total = at;
    return l;
}

namespace
{

//! Runs one block's phases on the CPU: thread 0..255 in turn, a barrier between phases.
template <class State>
struct HostExec
{
    State* states;

    template <class F>
    void each(F&& f)
    {
        for (int tid = 0; tid < steps::kBlockThreads; ++tid)
        {
            f(tid, states[tid]);
        }
    }
};

template <typename T>
void runOnHost(Problem const& p, Scratch const& s, void const* x, float const* size, void const* metric, void* xOut,
    float* sizeOut, int64_t* numTokensOut)
{
    if (p.splitMode == ATM_SPLIT_SIZE)
    {
        std::vector<steps::NoState> states(steps::kBlockThreads);
        HostExec<steps::NoState> ex{states.data()};
        std::vector<float> sizes(p.unprotected);
        steps::SplitArgs const args = splitArgs(p, s, size);
        int32_t const blocks = (p.unprotected + steps::kBlockThreads - 1) / steps::kBlockThreads;
        for (int64_t b = 0; b < p.batch; ++b)
        {
            for (int32_t bx = 0; bx < blocks; ++bx)
            {
                steps::splitBlock(ex, sizes.data(), args, b, bx);
            }
        }
    }
    if (p.salience)
    {
        // The three salience launches, one after the other (each reads the previous one's output).
        steps::SalienceArgs const args = salienceArgs(p, s, metric);
        std::vector<steps::SalienceThread> states(steps::kBlockThreads);
        HostExec<steps::SalienceThread> ex{states.data()};
        std::vector<steps::SalienceShared> shared(1);
        int32_t const tiles = salienceTiles(p);
        for (int64_t b = 0; b < p.batch; ++b)
        {
            for (int32_t tile = 0; tile < tiles; ++tile)
            {
                steps::salienceBlock<T, steps::SaliencePass::kRows>(ex, shared[0], args, b, tile);
            }
        }
        for (int64_t b = 0; b < p.batch; ++b)
        {
            for (int32_t tile = 0; tile < tiles; ++tile)
            {
                steps::salienceBlock<T, steps::SaliencePass::kColumns>(ex, shared[0], args, b, tile);
            }
        }
        std::vector<steps::NoState> none(steps::kBlockThreads);
        HostExec<steps::NoState> plain{none.data()};
        std::vector<steps::NormalizeShared> normalize(1);
        for (int64_t b = 0; b < p.batch; ++b)
        {
            steps::salienceNormalizeBlock(plain, normalize[0], args, b);
        }
    }
    {
        std::vector<steps::MatchThread> states(steps::kBlockThreads);
        HostExec<steps::MatchThread> ex{states.data()};
        std::vector<steps::MatchShared> shared(1);
        steps::MatchArgs const args = matchArgs(p, s, metric);
        for (int64_t b = 0; b < p.batch; ++b)
        {
            for (int32_t tile = 0; tile < p.tilesA; ++tile)
            {
                steps::matchBlock<T>(ex, shared[0], args, b, tile);
            }
        }
    }
    {
        std::vector<steps::NoState> states(steps::kBlockThreads);
        HostExec<steps::NoState> ex{states.data()};
        // std::max_align_t storage: the shared block starts with int64 partial sums.
        std::vector<std::max_align_t> smem(steps::planSharedBytes(p.na) / sizeof(std::max_align_t) + 1);
        steps::PlanArgs const args = planArgs(p, s, size, sizeOut, numTokensOut);
        for (int64_t b = 0; b < p.batch; ++b)
        {
            steps::planBlock(ex, reinterpret_cast<unsigned char*>(smem.data()), args, b);
        }
    }
    steps::MergeArgs const args = mergeArgs(p, s, x, size, xOut, sizeOut, numTokensOut);
    int const width = vectorWidth(p, x, xOut);
    for (int64_t b = 0; b < p.batch; ++b)
    {
        for (int64_t o = 0; o < p.numTokens; ++o)
        {
            for (int lane = 0; lane < steps::kWarpSize; ++lane)
            {
                if (width == 1)
                {
                    steps::mergeLane<T, 1>(args, b, o, lane);
                }
                else
                {
                    steps::mergeLane<T, 16 / sizeof(T)>(args, b, o, lane);
                }
            }
        }
    }
}

} // namespace
} // namespace detail
} // namespace atm

using atm::detail::fail;

extern "C" size_t atm_token_merge_params_size(void)
{
    return sizeof(atm_token_merge_params);
}

extern "C" int atm_token_merge_check(atm_token_merge_params const* params)
{
    atm::detail::Problem p;
    return atm::detail::describe(params, &p);
}

extern "C" size_t atm_token_merge_workspace_size(atm_token_merge_params const* params)
{
    atm::detail::Problem p;
    if (atm::detail::describe(params, &p) != ATM_STATUS_OK)
    {
        return 0;
    }
    return atm::detail::layoutFor(p).total;
}

extern "C" int atm_token_merge_host(atm_token_merge_params const* params, void const* x, float const* size,
    void const* metric, void* x_out, float* size_out, int64_t* num_tokens_out)
{
    atm::detail::Problem p;
    int const status = atm::detail::describe(params, &p);
    if (status != ATM_STATUS_OK)
    {
        return status;
    }
    if (x == nullptr || size == nullptr || metric == nullptr || x_out == nullptr || size_out == nullptr
        || num_tokens_out == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "a tensor pointer is NULL");
    }
    try
    {
        atm::detail::WorkspaceLayout const layout = atm::detail::layoutFor(p);
        std::vector<std::max_align_t> workspace(layout.total / sizeof(std::max_align_t) + 1);
        atm::detail::Scratch const s = atm::detail::carve(workspace.data(), layout, p);
        switch (p.dtype)
        {
        case ATM_DTYPE_FLOAT32:
            atm::detail::runOnHost<float>(p, s, x, size, metric, x_out, size_out, num_tokens_out);
            break;
        case ATM_DTYPE_FLOAT16:
            atm::detail::runOnHost<__half>(p, s, x, size, metric, x_out, size_out, num_tokens_out);
            break;
        default: atm::detail::runOnHost<__nv_bfloat16>(p, s, x, size, metric, x_out, size_out, num_tokens_out);
        }
    }
    catch (std::bad_alloc const&)
    {
        return fail(ATM_STATUS_INTERNAL_ERROR, "out of host memory for the workspace");
    }
    catch (std::exception const& e)
    {
        return fail(ATM_STATUS_INTERNAL_ERROR, e.what());
    }
    return ATM_STATUS_OK;
}

extern "C" char const* atm_token_merge_status_string(int status)
{
    switch (status)
    {
    case ATM_STATUS_OK: return "ok";
    case ATM_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case ATM_STATUS_UNSUPPORTED: return "unsupported";
    case ATM_STATUS_WORKSPACE_TOO_SMALL: return "workspace too small";
    case ATM_STATUS_CUDA_ERROR: return "CUDA error";
    case ATM_STATUS_INTERNAL_ERROR: return "internal error";
    default: return "unknown status";
    }
}

extern "C" char const* atm_token_merge_last_error(void)
{
    return atm::detail::tLastError.c_str();
}

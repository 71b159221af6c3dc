/*
 * Host-side plumbing shared by the CUDA launcher (tokenMergeKernel.cu) and the CPU executor
 * (tokenMergeHost.cpp): parameter checks, the workspace layout, and the argument structs of the
 * block programs. Both paths build their arguments here, so they cannot drift apart.
 */
#ifndef ATM_TOKEN_MERGE_INTERNAL_H
#define ATM_TOKEN_MERGE_INTERNAL_H

#include "tokenMergeKernel.h"
#include "tokenMergeSalience.h"
#include "tokenMergeSteps.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace atm
{
namespace detail
{

//! A checked atm_token_merge_params with the derived sizes.
struct Problem
{
    int64_t batch;
    int64_t numTokens;
    int64_t channels;
    int64_t dim;
    int32_t numProtected;
    int32_t unprotected;
    int32_t na;
    int32_t nb;
    int32_t firstA; //!< alternate split: first A / B position (steps::splitShape)
    int32_t firstB;
    int32_t tilesA; //!< 0 when A is empty: match_kernel is not launched
    int32_t splitMode;
    steps::CountRule rule; //!< fixed_r, r_max and the intensity rule's statistics
    float threshold;
    int32_t dtype;
    bool salience;         //!< weighting = salience (AdaMerge)
    float temperature;

    bool intensity() const
    {
        return rule.intensity();
    }
};

//! Record `message` as this thread's last error and return `status`.
int fail(int status, std::string const& message);

//! Check params; on success fill `problem` and return ATM_STATUS_OK.
int describe(atm_token_merge_params const* params, Problem* problem);

//! Byte offsets of the scratch arrays inside the workspace; each starts 256-byte aligned.
struct WorkspaceLayout
{
    size_t order;     //!< int32 [B, M] (size split only)
    size_t score;     //!< float [B, Na]
    size_t dst;       //!< int32 [B, Na]
    size_t tileCount; //!< int32 [B, tilesA]
    size_t plan;      //!< int32 [B, N]
    size_t srcOffset; //!< int32 [B, Nb + 1]
    size_t srcList;   //!< int32 [B, Na]
    size_t rowMax;       //!< float [B, M] (salience only): softmax row statistics
    size_t rowSum;       //!< float [B, M] (salience only)
    size_t salience;     //!< float [B, M] (salience only): column sums, then the salience
    size_t mergedWeight; //!< float [B, Nb] (salience only): B rows' total merge weights
    size_t tileScore;    //!< float [B, tilesA] (intensity rule only): score sums per A tile
    size_t total;
};

WorkspaceLayout layoutFor(Problem const& p);

struct Scratch
{
    int32_t* order;
    float* score;
    int32_t* dst;
    int32_t* tileCount;
    int32_t* plan;
    int32_t* srcOffset;
    int32_t* srcList;
    float* rowMax; //!< the salience arrays: nullptr for weighting = size
    float* rowSum;
    float* salience;
    float* mergedWeight;
    float* tileScore; //!< nullptr unless the intensity rule counts
};

inline Scratch carve(void* workspace, WorkspaceLayout const& layout, Problem const& p)
{
    auto* base = static_cast<unsigned char*>(workspace);
    auto const floats = [&](size_t offset, bool used) { return used ? reinterpret_cast<float*>(base + offset) : nullptr; };
    Scratch s;
    s.order = p.splitMode == ATM_SPLIT_SIZE ? reinterpret_cast<int32_t*>(base + layout.order) : nullptr;
    s.score = reinterpret_cast<float*>(base + layout.score);
    s.dst = reinterpret_cast<int32_t*>(base + layout.dst);
    s.tileCount = reinterpret_cast<int32_t*>(base + layout.tileCount);
    s.plan = reinterpret_cast<int32_t*>(base + layout.plan);
    s.srcOffset = reinterpret_cast<int32_t*>(base + layout.srcOffset);
    s.srcList = reinterpret_cast<int32_t*>(base + layout.srcList);
    s.rowMax = floats(layout.rowMax, p.salience);
    s.rowSum = floats(layout.rowSum, p.salience);
    s.salience = floats(layout.salience, p.salience);
    s.mergedWeight = floats(layout.mergedWeight, p.salience);
    s.tileScore = floats(layout.tileScore, p.intensity());
    return s;
}

inline steps::SplitView splitView(Problem const& p, Scratch const& s)
{
    steps::SplitView v;
    v.numProtected = p.numProtected;
    v.unprotected = p.unprotected;
    v.na = p.na;
    v.nb = p.nb;
    v.firstA = p.firstA;
    v.firstB = p.firstB;
    v.order = s.order;
    return v;
}

inline steps::SplitArgs splitArgs(Problem const& p, Scratch const& s, float const* size)
{
    steps::SplitArgs a;
    a.size = size;
    a.numTokens = p.numTokens;
    a.numProtected = p.numProtected;
    a.unprotected = p.unprotected;
    a.order = s.order;
    return a;
}

inline steps::SalienceArgs salienceArgs(Problem const& p, Scratch const& s, void const* metric)
{
    steps::SalienceArgs a;
    a.metric = metric;
    a.numTokens = p.numTokens;
    a.dim = p.dim;
    a.numProtected = p.numProtected;
    a.unprotected = p.unprotected;
    a.temperature = p.temperature;
    a.rowMax = s.rowMax;
    a.rowSum = s.rowSum;
    a.salience = s.salience;
    return a;
}

//! Blocks per image of the salience passes (32 tokens each; M >= 1, so never 0).
inline int32_t salienceTiles(Problem const& p)
{
    return (p.unprotected + steps::kTile - 1) / steps::kTile;
}

inline steps::MatchArgs matchArgs(Problem const& p, Scratch const& s, void const* metric)
{
    steps::MatchArgs a;
    a.metric = metric;
    a.split = splitView(p, s);
    a.numTokens = p.numTokens;
    a.dim = p.dim;
    a.threshold = p.threshold;
    a.salience = s.salience;
    a.score = s.score;
    a.dst = s.dst;
    a.tileCount = s.tileCount;
    a.tileScore = s.tileScore;
    a.tilesA = p.tilesA;
    return a;
}

inline steps::PlanArgs planArgs(
    Problem const& p, Scratch const& s, float const* size, float* sizeOut, int64_t* numTokensOut)
{
    steps::PlanArgs a;
    a.score = s.score;
    a.dst = s.dst;
    a.tileCount = s.tileCount;
    a.tileScore = s.tileScore;
    a.tilesA = p.tilesA;
    a.batch = p.batch;
    a.rule = p.rule;
    a.size = size;
    a.salience = s.salience;
    a.split = splitView(p, s);
    a.numTokens = p.numTokens;
    a.plan = s.plan;
    a.srcOffset = s.srcOffset;
    a.srcList = s.srcList;
    a.mergedWeight = s.mergedWeight;
    a.sizeOut = sizeOut;
    a.numTokensOut = numTokensOut;
    return a;
}

inline steps::MergeArgs mergeArgs(Problem const& p, Scratch const& s, void const* x, float const* size, void* xOut,
    float const* sizeOut, int64_t const* numTokensOut)
{
    steps::MergeArgs a;
    a.x = x;
    a.size = size;
    a.xOut = xOut;
    a.sizeOut = sizeOut;
    a.salience = s.salience;
    a.mergedWeight = s.mergedWeight;
    a.plan = s.plan;
    a.srcOffset = s.srcOffset;
    a.srcList = s.srcList;
    a.numTokensOut = numTokensOut;
    a.split = splitView(p, s);
    a.numTokens = p.numTokens;
    a.channels = p.channels;
    return a;
}

inline size_t elementBytes(int32_t dtype)
{
    return dtype == ATM_DTYPE_FLOAT32 ? 4 : 2;
}

//! Channels per merge access: 16 bytes when the rows allow it, else 1 element.
inline int vectorWidth(Problem const& p, void const* x, void const* xOut)
{
    size_t const bytes = elementBytes(p.dtype);
    int const width = static_cast<int>(16 / bytes);
    bool const aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(xOut) % 16 == 0;
    return (aligned && p.channels % width == 0) ? width : 1;
}

} // namespace detail
} // namespace atm

#endif // ATM_TOKEN_MERGE_INTERNAL_H

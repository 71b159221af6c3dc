/*
 * The TensorRT plugin's host logic that needs no TensorRT: reading the op's attributes from plugin
 * fields, checking them and the input shapes, and the output token bounds given to TensorRT.
 * It lives in the kernel library so that CI can test it through ctypes; tokenMergePlugin.cpp
 * only translates TensorRT types to these.
 */
#ifndef ATM_TOKEN_MERGE_ATTRIBUTES_H
#define ATM_TOKEN_MERGE_ATTRIBUTES_H

#include "tokenMergeContract.h"
#include "tokenMergeKernel.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Field types, numerically equal to nvinfer1::PluginFieldType (checked by static_assert in
 * tokenMergePlugin.cpp), so that a plugin field's type converts with a cast. */
enum atm_field_type
{
    ATM_FIELD_FLOAT16 = 0,
    ATM_FIELD_FLOAT32 = 1,
    ATM_FIELD_FLOAT64 = 2,
    ATM_FIELD_INT8 = 3,
    ATM_FIELD_INT16 = 4,
    ATM_FIELD_INT32 = 5,
    ATM_FIELD_CHAR = 6,
    ATM_FIELD_INT64 = 10
};

/* The attributes of docs/token-merge-op.md, in contract.Attributes' order: those of ATM's math,
 * two token counts for TensorRT (no effect on the math), and AdaMerge's six. Names and defaults:
 * tokenMergeContract.h. How many pairs merge: fixed_r if >= 0, else the intensity rule if
 * r_max >= 0, else the threshold. */
typedef struct atm_token_merge_attributes
{
    float threshold;        /* merge the pairs scoring above this (the threshold rule) */
    int32_t fixed_r;        /* >= 0: merge this many pairs; < 0: the intensity or threshold rule */
    int32_t split_mode;     /* atm_token_merge_split_mode */
    int32_t num_protected;  /* leading tokens that are never merged */
    int32_t opt_num_tokens; /* the size tensor's auto-tuning value (-1: unknown) */
    int32_t max_num_tokens; /* the model's input token count, a bound on N (-1: unknown) */
    int32_t weighting;      /* atm_token_merge_weighting: 0 size (ATM), 1 salience (AdaMerge) */
    float salience_temperature; /* tau of the salience softmax (weighting = 1; > 0) */
    int32_t r_max;          /* >= 0 (and fixed_r < 0): AdaMerge's intensity rule; -1: off */
    float redundancy_mean;  /* the intensity rule: r_b = floor(r_max * sigmoid(redundancy_scale */
    float redundancy_std;   /*   * (rho_b - redundancy_mean) / redundancy_std)), std > 0 */
    float redundancy_scale;
} atm_token_merge_attributes;

/* One named value, as TensorRT's PluginField: `length` elements of `type` at `data`. */
typedef struct atm_plugin_field
{
    const char* name;
    const void* data;
    int32_t type;
    int32_t length;
} atm_plugin_field;

ATM_TOKEN_MERGE_API void atm_token_merge_default_attributes(atm_token_merge_attributes* out);

/* Start from the defaults and apply `fields`. Accepted: threshold, salience_temperature,
 * redundancy_mean, redundancy_std, redundancy_scale (float32/float64 or an integer type); fixed_r,
 * split_mode, num_protected, opt_num_tokens, max_num_tokens, weighting, r_max (any integer type,
 * in int32 range); plugin_version and plugin_namespace are accepted and ignored (the ONNX parser's
 * lookup keys). Any other name, a wrong type, an empty field or an invalid value is an error
 * (message: atm_token_merge_last_error). */
ATM_TOKEN_MERGE_API int atm_token_merge_parse_attributes(
    const atm_plugin_field* fields, int32_t count, atm_token_merge_attributes* out);

/* contract.Attributes' rules: split_mode in {0, 1}, num_protected >= 0, opt_num_tokens and
 * max_num_tokens >= -1, weighting in {0, 1}, salience_temperature finite and > 0 when weighting = 1,
 * r_max >= -1; under the intensity rule (fixed_r < 0, r_max >= 0) redundancy_std finite and > 0
 * and redundancy_mean / redundancy_scale finite; under the threshold rule threshold not NaN. */
ATM_TOKEN_MERGE_API int atm_token_merge_validate_attributes(const atm_token_merge_attributes* attrs);

/* Check the input shapes x [B, N, C], size [B, N], metric [B, N, D]; -1 marks a dimension not
 * known yet (build time), which matches anything. Checks ranks, equal B and N, and, where N is
 * known, num_protected < N, N - num_protected <= ATM_TOKEN_MERGE_MAX_UNPROTECTED and (when the
 * node carries it) N <= max_num_tokens, the bound the workspace may have been sized by. */
ATM_TOKEN_MERGE_API int atm_token_merge_check_shapes(const int64_t* x_dims, int32_t x_rank,
    const int64_t* size_dims, int32_t size_rank, const int64_t* metric_dims, int32_t metric_rank,
    const atm_token_merge_attributes* attrs);

/* The kernels' parameters for concrete shapes x [B, N, C], metric [B, N, D]. */
ATM_TOKEN_MERGE_API int atm_token_merge_make_params(const int64_t* x_dims, const int64_t* metric_dims,
    const atm_token_merge_attributes* attrs, int32_t dtype, atm_token_merge_params* out);

/* Output token count K for N input tokens (M = N - num_protected), as the plugin declares it
 * (atm::tokenBounds below, the same formula over TensorRT expressions):
 * - fixed_r >= 0: K is known from N, opt = upper = N - min(fixed_r, floor(M/2)) (the plugin
 *   declares a plain dimension, no size tensor);
 * - fixed_r < 0 (threshold or intensity rule: a size tensor): opt = opt_num_tokens when set (> 0),
 *   else, when N is a build-time constant (`num_tokens_constant` != 0), N - floor(cap / 2) with
 *   cap = floor(M/2) (the threshold rule) or min(r_max, floor(M/2)) (the intensity rule, which
 *   never merges more than r_max), else P + 1 (opt must not depend on a size tensor, and after
 *   the first merge N is one); upper = max_num_tokens when N is not constant and the node carries
 *   it, else N. */
ATM_TOKEN_MERGE_API int atm_token_merge_token_bounds(int64_t num_tokens, int32_t num_tokens_constant,
    const atm_token_merge_attributes* attrs, int64_t* opt, int64_t* upper);

/* The largest input token count N the node can see, for sizing the workspace and checking the
 * profile's max shapes: TensorRT's reported max (`reported_max`; < 0 when unknown, as it may be
 * when N is an earlier merge's size tensor), at most max_num_tokens when the node carries it (no
 * N exceeds the model's input count); max_num_tokens alone when TensorRT reports none. Neither
 * known: ATM_STATUS_INVALID_ARGUMENT, with the reason in atm_token_merge_last_error. */
ATM_TOKEN_MERGE_API int atm_token_merge_max_input_tokens(
    int64_t reported_max, const atm_token_merge_attributes* attrs, int64_t* out);

#ifdef __cplusplus
}

namespace atm
{

template <class Expr>
struct TokenBounds
{
    Expr opt;
    Expr upper;
};

/* K for a fixed r: N - min(fixed_r, floor(M/2)), M = N - P (atm_export.merge.tokens_after_fixed_r). */
template <class Alg>
typename Alg::Expr fixedOutputTokens(Alg& alg, typename Alg::Expr n, atm_token_merge_attributes const& attrs)
{
    auto const cap = alg.floorDiv(alg.sub(n, alg.constant(attrs.num_protected)), alg.constant(2)); // ToMe's cap
    return alg.sub(n, alg.min(alg.constant(attrs.fixed_r), cap));
}

/* The bounds as a formula over an algebra of dimension expressions: integers for the C function
 * above, IExprBuilder expressions in the plugin. Alg provides constant, sub, min, floorDiv.
 * nConstant: N is a build-time constant (not an earlier merge's size tensor). */
template <class Alg>
TokenBounds<typename Alg::Expr> tokenBounds(
    Alg& alg, typename Alg::Expr n, bool nConstant, atm_token_merge_attributes const& attrs)
{
    if (attrs.fixed_r >= 0)
    {
        auto const k = fixedOutputTokens(alg, n, attrs);
        return TokenBounds<typename Alg::Expr>{k, k};
    }
    auto cap = alg.floorDiv(alg.sub(n, alg.constant(attrs.num_protected)), alg.constant(2));
    if (attrs.r_max >= 0)
    {
        cap = alg.min(alg.constant(attrs.r_max), cap); // the intensity rule: r_b <= r_max
    }
    // opt must not depend on a size tensor: the exporter's recorded count, else N - the expected
    // r (half the cap) for a constant N, else a constant that is always in range (P + 1).
    auto const opt = attrs.opt_num_tokens > 0
        ? alg.constant(attrs.opt_num_tokens)
        : (nConstant ? alg.sub(n, alg.floorDiv(cap, alg.constant(2))) : alg.constant(attrs.num_protected + 1));
    // upper: N (nothing merged). When N is an earlier merge's size tensor, its bound is that of a
    // chain of size tensors; the model's input count is the same bound as a plain constant, which
    // TensorRT can allocate the outputs by without propagating bounds through the chain.
    auto const upper = (!nConstant && attrs.max_num_tokens > 0) ? alg.constant(attrs.max_num_tokens) : n;
    return TokenBounds<typename Alg::Expr>{opt, upper};
}

} // namespace atm
#endif

#endif /* ATM_TOKEN_MERGE_ATTRIBUTES_H */

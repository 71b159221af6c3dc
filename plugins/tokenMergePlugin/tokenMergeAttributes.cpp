/*
 * Attribute parsing, shape checks and token bounds for the TensorRT plugin (see the header).
 */
#include "tokenMergeAttributes.h"
#include "tokenMergeInternal.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

namespace
{

using atm::detail::fail;

// Attribute names and defaults come from the op contract (tokenMergeContract.h).
constexpr char const* kThreshold = ATM_TOKEN_MERGE_ATTR_THRESHOLD;
constexpr char const* kFixedR = ATM_TOKEN_MERGE_ATTR_FIXED_R;
constexpr char const* kSplitMode = ATM_TOKEN_MERGE_ATTR_SPLIT_MODE;
constexpr char const* kNumProtected = ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED;
constexpr char const* kOptNumTokens = ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS;
constexpr char const* kMaxNumTokens = ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS;
constexpr char const* kWeighting = ATM_TOKEN_MERGE_ATTR_WEIGHTING;
constexpr char const* kSalienceTemperature = ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE;
constexpr char const* kRMax = ATM_TOKEN_MERGE_ATTR_R_MAX;
constexpr char const* kRedundancyMean = ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN;
constexpr char const* kRedundancyStd = ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD;
constexpr char const* kRedundancyScale = ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE;

//! Every attribute, for the "unknown attribute" message.
constexpr char const* kAttributeList = ATM_TOKEN_MERGE_ATTR_THRESHOLD ", " ATM_TOKEN_MERGE_ATTR_FIXED_R
    ", " ATM_TOKEN_MERGE_ATTR_SPLIT_MODE ", " ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED ", " ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS
    ", " ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS ", " ATM_TOKEN_MERGE_ATTR_WEIGHTING
    ", " ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE ", " ATM_TOKEN_MERGE_ATTR_R_MAX
    ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD
    ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE;

bool isNamed(atm_plugin_field const& f, char const* name)
{
    return std::strcmp(f.name, name) == 0;
}

//! The first element of an integer field as int64; false for a non-integer type.
bool readInteger(atm_plugin_field const& f, int64_t* value)
{
    switch (f.type)
    {
    case ATM_FIELD_INT8: *value = *static_cast<int8_t const*>(f.data); return true;
    case ATM_FIELD_INT16: *value = *static_cast<int16_t const*>(f.data); return true;
    case ATM_FIELD_INT32: *value = *static_cast<int32_t const*>(f.data); return true;
    case ATM_FIELD_INT64: *value = *static_cast<int64_t const*>(f.data); return true;
    default: return false;
    }
}

int readInt32(atm_plugin_field const& f, int32_t* out)
{
    int64_t v = 0;
    if (!readInteger(f, &v))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            std::string("attribute ") + f.name + " must be an integer, got field type " + std::to_string(f.type));
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, std::string("attribute ") + f.name + " = " + std::to_string(v)
                + " does not fit in int32");
    }
    *out = static_cast<int32_t>(v);
    return ATM_STATUS_OK;
}

//! A float attribute: float32 from the ONNX parser; float64 and integers from hand-built networks.
int readFloat(atm_plugin_field const& f, float* out)
{
    if (f.type == ATM_FIELD_FLOAT32)
    {
        *out = *static_cast<float const*>(f.data);
        return ATM_STATUS_OK;
    }
    if (f.type == ATM_FIELD_FLOAT64)
    {
        *out = static_cast<float>(*static_cast<double const*>(f.data));
        return ATM_STATUS_OK;
    }
    int64_t v = 0;
    if (readInteger(f, &v))
    {
        *out = static_cast<float>(v);
        return ATM_STATUS_OK;
    }
    return fail(ATM_STATUS_INVALID_ARGUMENT,
        std::string("attribute ") + f.name + " must be a float, got field type " + std::to_string(f.type));
}

//! Where a field's value goes: an int32 or a float member of the attributes; both null if unknown.
struct Slot
{
    int32_t* integer;
    float* real;
};

Slot slotOf(atm_plugin_field const& f, atm_token_merge_attributes* attrs)
{
    struct Named
    {
        char const* name;
        Slot slot;
    };
    Named const table[] = {
        {kThreshold, {nullptr, &attrs->threshold}},
        {kFixedR, {&attrs->fixed_r, nullptr}},
        {kSplitMode, {&attrs->split_mode, nullptr}},
        {kNumProtected, {&attrs->num_protected, nullptr}},
        {kOptNumTokens, {&attrs->opt_num_tokens, nullptr}},
        {kMaxNumTokens, {&attrs->max_num_tokens, nullptr}},
        {kWeighting, {&attrs->weighting, nullptr}},
        {kSalienceTemperature, {nullptr, &attrs->salience_temperature}},
        {kRMax, {&attrs->r_max, nullptr}},
        {kRedundancyMean, {nullptr, &attrs->redundancy_mean}},
        {kRedundancyStd, {nullptr, &attrs->redundancy_std}},
        {kRedundancyScale, {nullptr, &attrs->redundancy_scale}},
    };
    for (Named const& entry : table)
    {
        if (isNamed(f, entry.name))
        {
            return entry.slot;
        }
    }
    return Slot{nullptr, nullptr};
}

int applyField(atm_plugin_field const& f, atm_token_merge_attributes* attrs)
{
    if (f.name == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "a plugin field has no name");
    }
    if (isNamed(f, ATM_TOKEN_MERGE_ATTR_PLUGIN_VERSION) || isNamed(f, ATM_TOKEN_MERGE_ATTR_PLUGIN_NAMESPACE))
    {
        return ATM_STATUS_OK; // lookup keys of the ONNX parser, not math
    }
    Slot const slot = slotOf(f, attrs);
    if (slot.integer == nullptr && slot.real == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            std::string("unknown attribute ") + f.name + " (expected " + kAttributeList + ")");
    }
    if (f.data == nullptr || f.length < 1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, std::string("attribute ") + f.name + " has no value");
    }
    return slot.real != nullptr ? readFloat(f, slot.real) : readInt32(f, slot.integer);
}

bool known(int64_t d)
{
    return d >= 0;
}

//! Whether the node carries max_num_tokens (a bound on N); 0 and -1 are "unknown".
bool boundsN(atm_token_merge_attributes const& attrs)
{
    return attrs.max_num_tokens > 0;
}

bool agree(int64_t a, int64_t b)
{
    return !known(a) || !known(b) || a == b;
}

std::string dimsText(int64_t const* dims, int32_t rank)
{
    std::ostringstream s;
    s << "[";
    for (int32_t i = 0; i < rank; ++i)
    {
        s << (i ? ", " : "") << dims[i];
    }
    s << "]";
    return s.str();
}

//! Integers as a dimension algebra, for atm::tokenBounds.
struct IntAlgebra
{
    using Expr = int64_t;
    Expr constant(int64_t v) const
    {
        return v;
    }
    Expr sub(Expr a, Expr b) const
    {
        return a - b;
    }
    Expr min(Expr a, Expr b) const
    {
        return a < b ? a : b;
    }
    Expr floorDiv(Expr a, Expr b) const
    {
        Expr q = a / b;
        return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
    }
};

} // namespace

extern "C" void atm_token_merge_default_attributes(atm_token_merge_attributes* out)
{
    out->threshold = ATM_TOKEN_MERGE_DEFAULT_THRESHOLD;
    out->fixed_r = ATM_TOKEN_MERGE_DEFAULT_FIXED_R;
    out->split_mode = ATM_TOKEN_MERGE_DEFAULT_SPLIT_MODE;
    out->num_protected = ATM_TOKEN_MERGE_DEFAULT_NUM_PROTECTED;
    out->opt_num_tokens = ATM_TOKEN_MERGE_DEFAULT_OPT_NUM_TOKENS;
    out->max_num_tokens = ATM_TOKEN_MERGE_DEFAULT_MAX_NUM_TOKENS;
    out->weighting = ATM_TOKEN_MERGE_DEFAULT_WEIGHTING;
    out->salience_temperature = ATM_TOKEN_MERGE_DEFAULT_SALIENCE_TEMPERATURE;
    out->r_max = ATM_TOKEN_MERGE_DEFAULT_R_MAX;
    out->redundancy_mean = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_MEAN;
    out->redundancy_std = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_STD;
    out->redundancy_scale = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_SCALE;
}

extern "C" int atm_token_merge_validate_attributes(atm_token_merge_attributes const* attrs)
{
    if (attrs == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "attributes are NULL");
    }
    if (attrs->split_mode != ATM_SPLIT_ALTERNATE && attrs->split_mode != ATM_SPLIT_SIZE)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "split_mode must be " + std::to_string(ATM_SPLIT_ALTERNATE) + " (alternate) or "
                + std::to_string(ATM_SPLIT_SIZE) + " (size), got " + std::to_string(attrs->split_mode));
    }
    if (attrs->num_protected < 0)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "num_protected must be >= 0, got " + std::to_string(attrs->num_protected));
    }
    if (attrs->opt_num_tokens < -1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "opt_num_tokens must be >= 1, or -1 for unknown, got " + std::to_string(attrs->opt_num_tokens));
    }
    if (attrs->max_num_tokens < -1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "max_num_tokens must be >= 1, or -1 for unknown, got " + std::to_string(attrs->max_num_tokens));
    }
    if (attrs->weighting != ATM_WEIGHTING_SIZE && attrs->weighting != ATM_WEIGHTING_SALIENCE)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "weighting must be " + std::to_string(ATM_WEIGHTING_SIZE) + " (size) or "
                + std::to_string(ATM_WEIGHTING_SALIENCE) + " (salience), got " + std::to_string(attrs->weighting));
    }
    if (attrs->weighting == ATM_WEIGHTING_SALIENCE
        && !(std::isfinite(attrs->salience_temperature) && attrs->salience_temperature > 0))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "salience_temperature must be > 0, got " + std::to_string(attrs->salience_temperature));
    }
    if (attrs->r_max < -1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "r_max must be >= -1, got " + std::to_string(attrs->r_max));
    }
    bool const intensity = attrs->fixed_r < 0 && attrs->r_max >= 0;
    if (intensity && !(std::isfinite(attrs->redundancy_std) && attrs->redundancy_std > 0))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "redundancy_std must be > 0, got " + std::to_string(attrs->redundancy_std));
    }
    if (intensity && !(std::isfinite(attrs->redundancy_mean) && std::isfinite(attrs->redundancy_scale)))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "redundancy_mean and redundancy_scale must be finite");
    }
    if (attrs->fixed_r < 0 && !intensity && std::isnan(attrs->threshold))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "threshold is NaN (and fixed_r < 0 asks for the threshold)");
    }
    return ATM_STATUS_OK;
}

extern "C" int atm_token_merge_parse_attributes(
    atm_plugin_field const* fields, int32_t count, atm_token_merge_attributes* out)
{
    if (out == nullptr || (count > 0 && fields == nullptr) || count < 0)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "no field array or no output");
    }
    atm_token_merge_attributes attrs;
    atm_token_merge_default_attributes(&attrs);
    for (int32_t i = 0; i < count; ++i)
    {
        int const status = applyField(fields[i], &attrs);
        if (status != ATM_STATUS_OK)
        {
            return status;
        }
    }
    int const status = atm_token_merge_validate_attributes(&attrs);
    if (status == ATM_STATUS_OK)
    {
        *out = attrs;
    }
    return status;
}

extern "C" int atm_token_merge_check_shapes(int64_t const* x_dims, int32_t x_rank, int64_t const* size_dims,
    int32_t size_rank, int64_t const* metric_dims, int32_t metric_rank, atm_token_merge_attributes const* attrs)
{
    if (x_dims == nullptr || size_dims == nullptr || metric_dims == nullptr || attrs == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "shape arguments are NULL");
    }
    if (x_rank != 3 || size_rank != 2 || metric_rank != 3)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "expected x [B, N, C], size [B, N], metric [B, N, D]; got ranks " + std::to_string(x_rank) + ", "
                + std::to_string(size_rank) + ", " + std::to_string(metric_rank));
    }
    bool const consistent = agree(x_dims[0], size_dims[0]) && agree(x_dims[0], metric_dims[0])
        && agree(size_dims[0], metric_dims[0]) && agree(x_dims[1], size_dims[1]) && agree(x_dims[1], metric_dims[1])
        && agree(size_dims[1], metric_dims[1]);
    if (!consistent)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "x " + dimsText(x_dims, 3) + ", size " + dimsText(size_dims, 2)
                + " and metric " + dimsText(metric_dims, 3) + " disagree on B or N");
    }
    int64_t const n = known(x_dims[1]) ? x_dims[1] : (known(size_dims[1]) ? size_dims[1] : metric_dims[1]);
    if (known(n) && n - attrs->num_protected < 1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "N = " + std::to_string(n) + " tokens leave nothing to merge with "
                + "num_protected = " + std::to_string(attrs->num_protected));
    }
    if (known(n) && n - attrs->num_protected > ATM_TOKEN_MERGE_MAX_UNPROTECTED)
    {
        return fail(ATM_STATUS_UNSUPPORTED, "N - num_protected = " + std::to_string(n - attrs->num_protected)
                + " exceeds the kernels' limit of " + std::to_string(ATM_TOKEN_MERGE_MAX_UNPROTECTED));
    }
    if (known(n) && boundsN(*attrs) && n > attrs->max_num_tokens)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "N = " + std::to_string(n) + " exceeds " ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS " = "
                + std::to_string(attrs->max_num_tokens) + " (the model's input token count)");
    }
    bool const emptyFeature = (x_dims[2] == 0) || (metric_dims[2] == 0) || (x_dims[0] == 0);
    if (emptyFeature)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "B, C and D must be >= 1");
    }
    return ATM_STATUS_OK;
}

extern "C" int atm_token_merge_make_params(int64_t const* x_dims, int64_t const* metric_dims,
    atm_token_merge_attributes const* attrs, int32_t dtype, atm_token_merge_params* out)
{
    if (x_dims == nullptr || metric_dims == nullptr || attrs == nullptr || out == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "make_params arguments are NULL");
    }
    atm_token_merge_params p;
    p.batch = x_dims[0];
    p.num_tokens = x_dims[1];
    p.channels = x_dims[2];
    p.metric_dim = metric_dims[2];
    p.num_protected = attrs->num_protected;
    p.split_mode = attrs->split_mode;
    p.fixed_r = attrs->fixed_r;
    p.threshold = attrs->threshold;
    p.dtype = dtype;
    p.weighting = attrs->weighting;
    p.salience_temperature = attrs->salience_temperature;
    p.r_max = attrs->r_max;
    p.redundancy_mean = attrs->redundancy_mean;
    p.redundancy_std = attrs->redundancy_std;
    p.redundancy_scale = attrs->redundancy_scale;
    int const status = atm_token_merge_check(&p);
    if (status == ATM_STATUS_OK)
    {
        *out = p;
    }
    return status;
}

extern "C" int atm_token_merge_token_bounds(int64_t num_tokens, int32_t num_tokens_constant,
    atm_token_merge_attributes const* attrs, int64_t* opt, int64_t* upper)
{
    if (attrs == nullptr || opt == nullptr || upper == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "token_bounds arguments are NULL");
    }
    if (num_tokens - attrs->num_protected < 1)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "num_tokens must exceed num_protected");
    }
    IntAlgebra alg;
    atm::TokenBounds<int64_t> const bounds = atm::tokenBounds(alg, num_tokens, num_tokens_constant != 0, *attrs);
    *opt = bounds.opt;
    *upper = bounds.upper;
    return ATM_STATUS_OK;
}

extern "C" int atm_token_merge_max_input_tokens(
    int64_t reported_max, atm_token_merge_attributes const* attrs, int64_t* out)
{
    if (attrs == nullptr || out == nullptr)
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT, "max_input_tokens arguments are NULL");
    }
    if (!known(reported_max) && !boundsN(*attrs))
    {
        return fail(ATM_STATUS_INVALID_ARGUMENT,
            "the input token count N has no upper bound: TensorRT reports none (N is an earlier merge's size "
            "tensor) and the node has no " ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS " attribute; re-export the model "
            "with an atm-export that writes it");
    }
    if (!known(reported_max))
    {
        *out = attrs->max_num_tokens;
    }
    else
    {
        *out = boundsN(*attrs) && reported_max > attrs->max_num_tokens ? attrs->max_num_tokens : reported_max;
    }
    return ATM_STATUS_OK;
}

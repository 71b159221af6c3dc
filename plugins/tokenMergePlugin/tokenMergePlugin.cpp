/*
 * TensorRT IPluginV3 adapter for TokenMerge: TensorRT types in, kernel library calls out.
 */
#include "tokenMergePlugin.h"

#include "tokenMergeContract.h"
#include "tokenMergeKernel.h"

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdio>
#include <exception>
#include <new>
#include <sstream>

namespace atm
{
namespace plugin
{

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IDimensionExpr;
using nvinfer1::IExprBuilder;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;

// The kernel library's field codes are TensorRT's, so fields convert with a cast.
// enqueue narrows the kernels' int64 count to the INT32 num_tokens output by copying its low four bytes.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the count narrowing assumes a little-endian target");
static_assert(static_cast<int32_t>(PluginFieldType::kFLOAT16) == ATM_FIELD_FLOAT16, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kFLOAT32) == ATM_FIELD_FLOAT32, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kFLOAT64) == ATM_FIELD_FLOAT64, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kINT8) == ATM_FIELD_INT8, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kINT16) == ATM_FIELD_INT16, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kINT32) == ATM_FIELD_INT32, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kCHAR) == ATM_FIELD_CHAR, "field type codes");
static_assert(static_cast<int32_t>(PluginFieldType::kINT64) == ATM_FIELD_INT64, "field type codes");

namespace
{

constexpr int32_t kNbInputs = 3;
constexpr int32_t kNbOutputs = 3;
constexpr int32_t kCountOutput = 2; // num_tokens (a size tensor when fixed_r < 0: threshold or intensity rule)

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

//! IExprBuilder as a dimension algebra for atm::tokenBounds; a null operand stays null.
struct TrtAlgebra
{
    using Expr = IDimensionExpr const*;
    IExprBuilder& builder;

    Expr constant(int64_t v) const
    {
        return builder.constant(v);
    }
    Expr op(nvinfer1::DimensionOperation operation, Expr a, Expr b) const
    {
        return (a == nullptr || b == nullptr) ? nullptr : builder.operation(operation, *a, *b);
    }
    Expr sub(Expr a, Expr b) const
    {
        return op(nvinfer1::DimensionOperation::kSUB, a, b);
    }
    Expr min(Expr a, Expr b) const
    {
        return op(nvinfer1::DimensionOperation::kMIN, a, b);
    }
    Expr floorDiv(Expr a, Expr b) const
    {
        return op(nvinfer1::DimensionOperation::kFLOOR_DIV, a, b);
    }
};

bool isFloatOrHalf(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF;
}

int32_t kernelDtype(DataType t)
{
    return t == DataType::kHALF ? ATM_DTYPE_FLOAT16 : ATM_DTYPE_FLOAT32;
}

void copyDims(nvinfer1::Dims const& dims, int64_t* out)
{
    for (int32_t i = 0; i < dims.nbDims && i < nvinfer1::Dims::MAX_DIMS; ++i)
    {
        out[i] = dims.d[i];
    }
}

//! The kernel library's shape check on TensorRT dims (-1 = not known yet).
int32_t checkShapes(nvinfer1::Dims const& x, nvinfer1::Dims const& size, nvinfer1::Dims const& metric,
    atm_token_merge_attributes const& attrs, char const* when)
{
    int64_t xd[nvinfer1::Dims::MAX_DIMS] = {};
    int64_t sd[nvinfer1::Dims::MAX_DIMS] = {};
    int64_t md[nvinfer1::Dims::MAX_DIMS] = {};
    copyDims(x, xd);
    copyDims(size, sd);
    copyDims(metric, md);
    int const status = atm_token_merge_check_shapes(xd, x.nbDims, sd, size.nbDims, md, metric.nbDims, &attrs);
    if (status != ATM_STATUS_OK)
    {
        logError(std::string(when) + ": " + atm_token_merge_last_error());
    }
    return status;
}

//! Kernel parameters for concrete dims; false (and a log line) if the kernels cannot run them.
bool paramsFor(nvinfer1::Dims const& x, nvinfer1::Dims const& metric, DataType type,
    atm_token_merge_attributes const& attrs, atm_token_merge_params* params)
{
    if (x.nbDims != 3 || metric.nbDims != 3)
    {
        logError("x and metric must be 3-D");
        return false;
    }
    int64_t xd[3] = {};
    int64_t md[3] = {};
    copyDims(x, xd);
    copyDims(metric, md);
    if (atm_token_merge_make_params(xd, md, &attrs, kernelDtype(type), params) != ATM_STATUS_OK)
    {
        logError(atm_token_merge_last_error());
        return false;
    }
    return true;
}

//! The inputs' max dims (x, size, metric) with N replaced by its bound (atm_token_merge_max_input_tokens):
//! TensorRT may report no max N (-1) when N is an earlier merge's size tensor. False, logged, if unbounded.
bool boundedMaxDims(DynamicPluginTensorDesc const* in, atm_token_merge_attributes const& attrs,
    nvinfer1::Dims (&maxDims)[kNbInputs], char const* when)
{
    int64_t n = -1;
    if (in[0].max.nbDims < 2 || atm_token_merge_max_input_tokens(in[0].max.d[1], &attrs, &n) != ATM_STATUS_OK)
    {
        logError(std::string(when) + ": " + (in[0].max.nbDims < 2 ? "x must be 3-D" : atm_token_merge_last_error()));
        return false;
    }
    for (int32_t i = 0; i < kNbInputs; ++i)
    {
        maxDims[i] = in[i].max;
        if (maxDims[i].nbDims >= 2)
        {
            maxDims[i].d[1] = n;
        }
    }
    return true;
}

std::string describe(atm_token_merge_attributes const& a)
{
    std::ostringstream s;
    s.precision(9);
    s << kPluginName << "(" ATM_TOKEN_MERGE_ATTR_THRESHOLD "=" << a.threshold
      << ", " ATM_TOKEN_MERGE_ATTR_FIXED_R "=" << a.fixed_r
      << ", " ATM_TOKEN_MERGE_ATTR_SPLIT_MODE "=" << a.split_mode
      << ", " ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED "=" << a.num_protected;
    // AdaMerge's attributes only where they change the math, so ATM nodes keep their description
    // (it is also the timing cache's key).
    if (a.weighting != ATM_TOKEN_MERGE_WEIGHTING_SIZE)
    {
        s << ", " ATM_TOKEN_MERGE_ATTR_WEIGHTING "=" << a.weighting
          << ", " ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE "=" << a.salience_temperature;
    }
    if (a.fixed_r < 0 && a.r_max >= 0)
    {
        s << ", " ATM_TOKEN_MERGE_ATTR_R_MAX "=" << a.r_max << ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN "="
          << a.redundancy_mean << ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD "=" << a.redundancy_std
          << ", " ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE "=" << a.redundancy_scale;
    }
    s << ")";
    return s.str();
}

//! The plugin fields of the attributes, as the ONNX parser passes them (floats FLOAT32, ints
//! INT32): pointing into `attrs`, or at nothing for the creator's list of names (attrs null).
void appendAttributeFields(std::vector<PluginField>& fields, atm_token_merge_attributes* attrs)
{
    using Type = PluginFieldType;
    bool const bound = attrs != nullptr;
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_THRESHOLD, bound ? &attrs->threshold : nullptr, Type::kFLOAT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_FIXED_R, bound ? &attrs->fixed_r : nullptr, Type::kINT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_SPLIT_MODE, bound ? &attrs->split_mode : nullptr, Type::kINT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED, bound ? &attrs->num_protected : nullptr, Type::kINT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS, bound ? &attrs->opt_num_tokens : nullptr, Type::kINT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS, bound ? &attrs->max_num_tokens : nullptr, Type::kINT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_WEIGHTING, bound ? &attrs->weighting : nullptr, Type::kINT32, 1);
    fields.emplace_back(
        ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE, bound ? &attrs->salience_temperature : nullptr, Type::kFLOAT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_R_MAX, bound ? &attrs->r_max : nullptr, Type::kINT32, 1);
    fields.emplace_back(
        ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN, bound ? &attrs->redundancy_mean : nullptr, Type::kFLOAT32, 1);
    fields.emplace_back(ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD, bound ? &attrs->redundancy_std : nullptr, Type::kFLOAT32, 1);
    fields.emplace_back(
        ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE, bound ? &attrs->redundancy_scale : nullptr, Type::kFLOAT32, 1);
}

} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void logError(std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string("[") + kPluginNamespace + " " + kPluginName + "] " + message;
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        if (logger != nullptr)
        {
            logger->log(nvinfer1::ILogger::Severity::kERROR, text.c_str());
            return;
        }
        std::fprintf(stderr, "%s\n", text.c_str());
    }
    catch (...)
    {
        // Logging must never throw into TensorRT.
    }
}

// ---------------------------------------------------------------------------------------------
// TokenMergePlugin

TokenMergePlugin::TokenMergePlugin(atm_token_merge_attributes const& attrs)
    : mAttrs(attrs)
{
    initFields();
}

TokenMergePlugin::TokenMergePlugin(TokenMergePlugin const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mAttrs(other.mAttrs)
{
    initFields();
}

void TokenMergePlugin::initFields()
{
    mFields.clear();
    appendAttributeFields(mFields, &mAttrs);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    mDescription = describe(mAttrs);
}

nvinfer1::IPluginCapability* TokenMergePlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* TokenMergePlugin::clone() noexcept
{
    try
    {
        return new TokenMergePlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* TokenMergePlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* TokenMergePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* TokenMergePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t TokenMergePlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t TokenMergePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 3 inputs (x, size, metric) and 3 outputs");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kFLOAT;
    // The headers of every TensorRT 10/11 release say size tensors must be INT32 (newer samples also
    // use INT64); INT32 is accepted by all of them. The ONNX graph casts num_tokens to int64.
    outputTypes[kCountOutput] = DataType::kINT32;
    return 0;
}

int32_t TokenMergePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 3 || inputs[1].nbDims != 2
        || inputs[2].nbDims != 3)
    {
        logError("expects x [B, N, C], size [B, N], metric [B, N, D] and 3 outputs");
        return -1;
    }
    IDimensionExpr const* n = inputs[0].d[1];
    if (n->isConstant() && n->getConstantValue() - mAttrs.num_protected < 1)
    {
        logError("N = " + std::to_string(n->getConstantValue()) + " leaves no token to merge with num_protected = "
            + std::to_string(mAttrs.num_protected));
        return -1;
    }
    // K, the output token count (tokenBounds): for a fixed r an expression of N (a constant when N
    // is), so num_tokens is a plain 0-D tensor and a graph with static N keeps static token dims
    // (TensorRT can capture CUDA graphs of it); for the threshold and the intensity rule (both
    // data-dependent) a size tensor with opt and upper.
    TrtAlgebra alg{exprBuilder};
    TokenBounds<IDimensionExpr const*> const bounds = tokenBounds(alg, n, n->isConstant(), mAttrs);
    bool const sizeTensor = mAttrs.fixed_r < 0;
    IDimensionExpr const* k = bounds.upper; // fixed r: opt = upper = K
    if (sizeTensor)
    {
        k = bounds.opt != nullptr && bounds.upper != nullptr
            ? exprBuilder.declareSizeTensor(kCountOutput, *bounds.opt, *bounds.upper)
            : nullptr;
    }
    if (k == nullptr)
    {
        logError(sizeTensor ? "could not declare the num_tokens size tensor" : "could not build the output token count");
        return -1;
    }
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = k;
    outputs[0].d[2] = inputs[0].d[2];
    outputs[1].nbDims = 2;
    outputs[1].d[0] = inputs[0].d[0];
    outputs[1].d[1] = k;
    outputs[kCountOutput].nbDims = 0; // a scalar (a size tensor for the threshold and intensity rules)
    return 0;
}

bool TokenMergePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloatOrHalf(desc.type);                     // x
    case 1: return desc.type == DataType::kFLOAT;                // size
    case 2: return desc.type == inOut[0].desc.type;              // metric: like x
    case 3: return desc.type == inOut[0].desc.type;              // x_out: like x
    case 4: return desc.type == DataType::kFLOAT;                // size_out
    default: return desc.type == DataType::kINT32;               // num_tokens
    }
}

int32_t TokenMergePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 3 inputs and 3 outputs");
        return -1;
    }
    if (!isFloatOrHalf(in[0].desc.type) || in[2].desc.type != in[0].desc.type || in[1].desc.type != DataType::kFLOAT)
    {
        logError("x and metric must both be float32 or both float16, size float32");
        return -1;
    }
    // Wildcard dims (-1) are allowed here; the max dims, N bounded as the workspace is, must be
    // runnable too.
    nvinfer1::Dims maxDims[kNbInputs];
    if (checkShapes(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims, mAttrs, "configurePlugin") != ATM_STATUS_OK
        || !boundedMaxDims(in, mAttrs, maxDims, "configurePlugin")
        || checkShapes(maxDims[0], maxDims[1], maxDims[2], mAttrs, "configurePlugin (max shapes)") != ATM_STATUS_OK)
    {
        return -1;
    }
    return 0;
}

namespace
{
//! Where the int64 count slot starts after the kernels' workspace (8-byte aligned).
size_t countSlotOffset(size_t kernelWorkspaceBytes)
{
    return (kernelWorkspaceBytes + alignof(int64_t) - 1) / alignof(int64_t) * alignof(int64_t);
}
} // namespace

size_t TokenMergePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    // The workspace grows with B and N only (for these attributes: weighting = salience adds the
    // salience arrays, the intensity rule the score sums), so the max shapes (N bounded by
    // max_num_tokens where TensorRT reports none) cover every runtime shape; onShapeChange refuses
    // an N above the bound.
    // It ends with one int64 slot for the count, which enqueue narrows into the INT32 output.
    // 0 (with a logged reason) where no bound is known: TensorRT then fails the build.
    atm_token_merge_params params;
    nvinfer1::Dims maxDims[kNbInputs];
    if (nbInputs != kNbInputs || !boundedMaxDims(inputs, mAttrs, maxDims, "getWorkspaceSize")
        || !paramsFor(maxDims[0], maxDims[2], inputs[0].desc.type, mAttrs, &params))
    {
        return 0;
    }
    return countSlotOffset(atm_token_merge_workspace_size(&params)) + sizeof(int64_t);
}

char const* TokenMergePlugin::getTimingCacheID() noexcept
{
    return mDescription.c_str();
}

char const* TokenMergePlugin::getMetadataString() noexcept
{
    return mDescription.c_str();
}

int32_t TokenMergePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 3 inputs and 3 outputs");
        return -1;
    }
    atm_token_merge_params params;
    bool const ok = checkShapes(in[0].dims, in[1].dims, in[2].dims, mAttrs, "onShapeChange") == ATM_STATUS_OK
        && paramsFor(in[0].dims, in[2].dims, in[0].type, mAttrs, &params);
    return ok ? 0 : -1;
}

int32_t TokenMergePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    atm_token_merge_params params;
    if (!paramsFor(inputDesc[0].dims, inputDesc[2].dims, inputDesc[0].type, mAttrs, &params))
    {
        return -1;
    }
    // TensorRT sized the workspace with getWorkspaceSize(max shapes) >= the size for these shapes.
    size_t const workspaceBytes = atm_token_merge_workspace_size(&params);
    auto* count = reinterpret_cast<int64_t*>(static_cast<unsigned char*>(workspace) + countSlotOffset(workspaceBytes));
    int const status = atm_token_merge_enqueue(&params, inputs[0], static_cast<float const*>(inputs[1]), inputs[2],
        outputs[0], static_cast<float*>(outputs[1]), count, workspace, workspaceBytes, stream);
    if (status != ATM_STATUS_OK)
    {
        logError(std::string("enqueue: ") + atm_token_merge_status_string(status) + ": " + atm_token_merge_last_error());
        return -1;
    }
    // The INT32 num_tokens is the low half of the int64 count (little-endian; the count is < 2^31).
    cudaError_t const copied = cudaMemcpyAsync(
        outputs[kCountOutput], count, sizeof(int32_t), cudaMemcpyDeviceToDevice, stream);
    if (copied != cudaSuccess)
    {
        logError(std::string("enqueue: copying num_tokens failed: ") + cudaGetErrorString(copied));
        return -1;
    }
    return 0;
}

nvinfer1::IPluginV3* TokenMergePlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* TokenMergePlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------
// TokenMergePluginCreator

TokenMergePluginCreator::TokenMergePluginCreator()
{
    // The fields the ONNX parser copies from the node's attributes (missing ones keep defaults).
    appendAttributeFields(mFieldNames, nullptr);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

char const* TokenMergePluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* TokenMergePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* TokenMergePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* TokenMergePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* TokenMergePluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        // Build and runtime phases get the same fields (getFieldsToSerialize writes these names).
        std::vector<atm_plugin_field> fields;
        int32_t const count = fc != nullptr ? fc->nbFields : 0;
        for (int32_t i = 0; i < count; ++i)
        {
            PluginField const& f = fc->fields[i];
            fields.push_back({f.name, f.data, static_cast<int32_t>(f.type), f.length});
        }
        atm_token_merge_attributes attrs;
        if (atm_token_merge_parse_attributes(fields.data(), count, &attrs) != ATM_STATUS_OK)
        {
            logError(std::string("node ") + (name != nullptr ? name : "?") + ": " + atm_token_merge_last_error());
            return nullptr;
        }
        return new TokenMergePlugin(attrs);
    }
    catch (std::exception const& e)
    {
        logError(std::string("createPlugin failed: ") + e.what());
    }
    return nullptr;
}

} // namespace plugin
} // namespace atm

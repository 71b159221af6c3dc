/*
 * CPU test harness for the TokenMerge TensorRT adapter. It needs the TensorRT headers but no
 * TensorRT library and no GPU: it calls the plugin's methods the way the builder and runtime
 * would (creator lookup through getCreators, createPlugin with the ONNX parser's fields, output
 * types and shapes, format negotiation, configure, workspace, serialization round trip, clone),
 * with a small expression builder that evaluates dimension expressions to numbers.
 *
 * This is not TensorRT and proves nothing about TensorRT's own behaviour (how it resolves size
 * tensors, allocates outputs or calls enqueue); it checks that our adapter does what it claims.
 * Exit status: the number of failed checks. Run by tests/plugins/test_plugin_adapter.py.
 */
#include "tokenMergeContract.h"
#include "tokenMergeKernel.h"
#include "tokenMergePlugin.h"

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <string>
#include <vector>

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

namespace
{

using namespace nvinfer1;

int gFailures = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
}

// ---- a numeric stand-in for TensorRT's dimension expressions ----

class ValueImpl : public apiv::VDimensionExpr
{
public:
    ValueImpl(int64_t value, bool constant, bool sizeTensor)
        : mValue(value)
        , mConstant(constant)
        , mSizeTensor(sizeTensor)
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return mSizeTensor;
    }
    int64_t value() const
    {
        return mValue;
    }

private:
    int64_t mValue;
    bool mConstant;
    bool mSizeTensor;
};

class Expr : public IDimensionExpr
{
public:
    explicit Expr(ValueImpl* impl)
        : mValueImpl(impl)
    {
        mImpl = impl;
    }
    int64_t value() const
    {
        return mValueImpl->value();
    }

private:
    ValueImpl* mValueImpl;
};

int64_t valueOf(IDimensionExpr const* e)
{
    return static_cast<Expr const*>(e)->value();
}

struct SizeTensorDecl
{
    int32_t outputIndex = -1;
    int64_t opt = -1;
    int64_t upper = -1;
};

class BuilderImpl : public apiv::VExprBuilder
{
public:
    //! An input dimension: a build-time constant, or a runtime value (e.g. a dynamic profile axis).
    IDimensionExpr const* input(int64_t value, bool constant)
    {
        return make(value, constant, false);
    }
    IDimensionExpr const* constant(int64_t value) override
    {
        return make(value, true, false);
    }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
    {
        int64_t const a = valueOf(&first);
        int64_t const b = valueOf(&second);
        int64_t v = 0;
        switch (op)
        {
        case DimensionOperation::kSUM: v = a + b; break;
        case DimensionOperation::kPROD: v = a * b; break;
        case DimensionOperation::kMAX: v = a > b ? a : b; break;
        case DimensionOperation::kMIN: v = a < b ? a : b; break;
        case DimensionOperation::kSUB: v = a - b; break;
        case DimensionOperation::kEQUAL: v = a == b; break;
        case DimensionOperation::kLESS: v = a < b; break;
        case DimensionOperation::kFLOOR_DIV: v = a / b - ((a % b != 0) && ((a < 0) != (b < 0))); break;
        case DimensionOperation::kCEIL_DIV: v = -((-a) / b - (((-a) % b != 0) && (((-a) < 0) != (b < 0)))); break;
        }
        return make(v, first.isConstant() && second.isConstant(), false);
    }
    IDimensionExpr const* declareSizeTensor(int32_t outputIndex, IDimensionExpr const& opt, IDimensionExpr const& upper) override
    {
        decl.outputIndex = outputIndex;
        decl.opt = valueOf(&opt);
        decl.upper = valueOf(&upper);
        return make(decl.upper, false, true);
    }

    SizeTensorDecl decl;

private:
    IDimensionExpr const* make(int64_t value, bool constant, bool sizeTensor)
    {
        mValues.push_back(std::make_unique<ValueImpl>(value, constant, sizeTensor));
        mExprs.push_back(std::make_unique<Expr>(mValues.back().get()));
        return mExprs.back().get();
    }
    std::deque<std::unique_ptr<ValueImpl>> mValues;
    std::deque<std::unique_ptr<Expr>> mExprs;
};

class Builder : public IExprBuilder
{
public:
    explicit Builder(BuilderImpl* impl)
    {
        mImpl = impl;
    }
};

// ---- logging capture through the library's setLoggerFinder entry point ----

class CaptureLogger : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        if (severity <= Severity::kERROR)
        {
            last = msg;
        }
    }
    std::string last;
};

class Finder : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    CaptureLogger logger;
};

// ---- helpers ----

Dims dims(std::vector<int64_t> const& values)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    for (size_t i = 0; i < values.size(); ++i)
    {
        d.d[i] = values[i];
    }
    return d;
}

DynamicPluginTensorDesc dynDesc(std::vector<int64_t> const& shape, DataType type)
{
    DynamicPluginTensorDesc d{};
    d.desc.dims = dims(shape);
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.scale = 1.0f;
    d.min = d.opt = d.max = dims(shape);
    return d;
}

//! Kernel params (C = 384, D = 64) with AdaMerge's attributes at the contract's defaults.
atm_token_merge_params atmParams(int64_t batch, int64_t n, int32_t splitMode, int32_t fixedR, float threshold,
    int32_t dtype)
{
    atm_token_merge_params p{};
    p.batch = batch;
    p.num_tokens = n;
    p.channels = 384;
    p.metric_dim = 64;
    p.num_protected = 1;
    p.split_mode = splitMode;
    p.fixed_r = fixedR;
    p.threshold = threshold;
    p.dtype = dtype;
    p.weighting = ATM_TOKEN_MERGE_DEFAULT_WEIGHTING;
    p.salience_temperature = ATM_TOKEN_MERGE_DEFAULT_SALIENCE_TEMPERATURE;
    p.r_max = ATM_TOKEN_MERGE_DEFAULT_R_MAX;
    p.redundancy_mean = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_MEAN;
    p.redundancy_std = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_STD;
    p.redundancy_scale = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_SCALE;
    return p;
}

struct Fields
{
    float threshold;
    int32_t fixedR;
    int32_t splitMode;
    int32_t numProtected;
    int32_t optNumTokens;
    int32_t maxNumTokens;
    int32_t weighting = ATM_TOKEN_MERGE_DEFAULT_WEIGHTING;
    float temperature = ATM_TOKEN_MERGE_DEFAULT_SALIENCE_TEMPERATURE;
    int32_t rMax = ATM_TOKEN_MERGE_DEFAULT_R_MAX;
    float mean = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_MEAN;
    float stdDev = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_STD;
    float scale = ATM_TOKEN_MERGE_DEFAULT_REDUNDANCY_SCALE;
    std::vector<PluginField> list;

    //! AdaMerge's six fields, as the ONNX parser passes them (weighting, r_max INT32; the rest FLOAT32).
    Fields& adamerge(int32_t w, float tau, int32_t rm, float mu, float sigma, float slope)
    {
        weighting = w;
        temperature = tau;
        rMax = rm;
        mean = mu;
        stdDev = sigma;
        scale = slope;
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_WEIGHTING, &weighting, PluginFieldType::kINT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE, &temperature, PluginFieldType::kFLOAT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_R_MAX, &rMax, PluginFieldType::kINT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN, &mean, PluginFieldType::kFLOAT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD, &stdDev, PluginFieldType::kFLOAT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE, &scale, PluginFieldType::kFLOAT32, 1);
        return *this;
    }

    //! optNumTokens / maxNumTokens -1: the field is absent, as for a node without the attribute.
    Fields(float t, int32_t r, int32_t s, int32_t p, int32_t opt = -1, int32_t maxN = -1)
        : threshold(t)
        , fixedR(r)
        , splitMode(s)
        , numProtected(p)
        , optNumTokens(opt)
        , maxNumTokens(maxN)
    {
        // What the ONNX parser passes: float attributes as FLOAT32, int attributes as INT32.
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_THRESHOLD, &threshold, PluginFieldType::kFLOAT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_FIXED_R, &fixedR, PluginFieldType::kINT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_SPLIT_MODE, &splitMode, PluginFieldType::kINT32, 1);
        list.emplace_back(ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED, &numProtected, PluginFieldType::kINT32, 1);
        if (opt != -1)
        {
            list.emplace_back(ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS, &optNumTokens, PluginFieldType::kINT32, 1);
        }
        if (maxN != -1)
        {
            list.emplace_back(ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS, &maxNumTokens, PluginFieldType::kINT32, 1);
        }
    }
    PluginFieldCollection collection() const
    {
        PluginFieldCollection fc;
        fc.nbFields = static_cast<int32_t>(list.size());
        fc.fields = list.data();
        return fc;
    }
};

IPluginV3OneBuild* buildOf(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}

IPluginV3OneRuntime* runtimeOf(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

IPluginV3OneCore* coreOf(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}

//! Read a plugin's serialized fields back into attribute values.
bool readFields(PluginFieldCollection const* fc, float* threshold, int32_t* fixedR, int32_t* splitMode, int32_t* numProtected)
{
    int found = 0;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (std::strcmp(f.name, ATM_TOKEN_MERGE_ATTR_THRESHOLD) == 0 && f.type == PluginFieldType::kFLOAT32)
        {
            *threshold = *static_cast<float const*>(f.data);
            ++found;
        }
        else if (f.type == PluginFieldType::kINT32)
        {
            int32_t const v = *static_cast<int32_t const*>(f.data);
            if (std::strcmp(f.name, ATM_TOKEN_MERGE_ATTR_FIXED_R) == 0)
            {
                *fixedR = v;
                ++found;
            }
            else if (std::strcmp(f.name, ATM_TOKEN_MERGE_ATTR_SPLIT_MODE) == 0)
            {
                *splitMode = v;
                ++found;
            }
            else if (std::strcmp(f.name, ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED) == 0)
            {
                *numProtected = v;
                ++found;
            }
        }
    }
    return found == 4;
}

// ---- the checks ----

IPluginCreatorV3One* creatorFromEntryPoint()
{
    int32_t count = 0;
    IPluginCreatorInterface* const* creators = getCreators(count);
    check(count == 1 && creators != nullptr && creators[0] != nullptr, "getCreators returns one creator");
    if (count != 1 || creators == nullptr || creators[0] == nullptr)
    {
        return nullptr;
    }
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1,
        std::string("creator interface is PLUGIN CREATOR_V3ONE 1.x (got ") + info.kind + ")");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), ATM_TOKEN_MERGE_PLUGIN_NAME) == 0,
        "creator name " ATM_TOKEN_MERGE_PLUGIN_NAME);
    check(std::strcmp(creator->getPluginVersion(), ATM_TOKEN_MERGE_PLUGIN_VERSION) == 0,
        "creator version " ATM_TOKEN_MERGE_PLUGIN_VERSION);
    check(std::strcmp(creator->getPluginNamespace(), ATM_TOKEN_MERGE_PLUGIN_NAMESPACE) == 0,
        "creator namespace " ATM_TOKEN_MERGE_PLUGIN_NAMESPACE);
    PluginFieldCollection const* names = creator->getFieldNames();
    bool namesOk = names != nullptr && names->nbFields == 12;
    for (int32_t i = 0; namesOk && i < names->nbFields; ++i)
    {
        std::string const n = names->fields[i].name;
        PluginFieldType const t = names->fields[i].type;
        bool const real = n == ATM_TOKEN_MERGE_ATTR_THRESHOLD || n == ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE
            || n == ATM_TOKEN_MERGE_ATTR_REDUNDANCY_MEAN || n == ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD
            || n == ATM_TOKEN_MERGE_ATTR_REDUNDANCY_SCALE;
        bool const integer = n == ATM_TOKEN_MERGE_ATTR_FIXED_R || n == ATM_TOKEN_MERGE_ATTR_SPLIT_MODE
            || n == ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED || n == ATM_TOKEN_MERGE_ATTR_OPT_NUM_TOKENS
            || n == ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS || n == ATM_TOKEN_MERGE_ATTR_WEIGHTING
            || n == ATM_TOKEN_MERGE_ATTR_R_MAX;
        namesOk = (real && t == PluginFieldType::kFLOAT32) || (integer && t == PluginFieldType::kINT32);
    }
    check(namesOk,
        "getFieldNames: threshold/salience_temperature/redundancy_mean/_std/_scale FLOAT32, "
        "fixed_r/split_mode/num_protected/opt_num_tokens/max_num_tokens/weighting/r_max INT32");
    return creator;
}

void checkCreation(IPluginCreatorV3One* creator, Finder& finder)
{
    PluginFieldCollection empty{};
    std::unique_ptr<IPluginV3> defaults(creator->createPlugin("node", &empty, TensorRTPhase::kBUILD));
    check(defaults != nullptr, "createPlugin without fields uses the defaults (parser passed none)");
    if (defaults)
    {
        float t = 0;
        int32_t r = 0, s = 0, p = 0;
        bool const read = readFields(runtimeOf(defaults.get())->getFieldsToSerialize(), &t, &r, &s, &p);
        check(read && t == ATM_TOKEN_MERGE_DEFAULT_THRESHOLD && r == ATM_TOKEN_MERGE_DEFAULT_FIXED_R
                && s == ATM_TOKEN_MERGE_DEFAULT_SPLIT_MODE && p == ATM_TOKEN_MERGE_DEFAULT_NUM_PROTECTED,
            "defaults: those of tokenMergeContract.h");
    }

    int32_t const unknownValue = 3;
    char const version[] = ATM_TOKEN_MERGE_PLUGIN_VERSION;
    char const pluginNamespace[] = ATM_TOKEN_MERGE_PLUGIN_NAMESPACE;
    std::vector<PluginField> extra{
        {ATM_TOKEN_MERGE_ATTR_PLUGIN_VERSION, version, PluginFieldType::kCHAR, sizeof(version)},
        {ATM_TOKEN_MERGE_ATTR_PLUGIN_NAMESPACE, pluginNamespace, PluginFieldType::kCHAR, sizeof(pluginNamespace)}};
    PluginFieldCollection keys{2, extra.data()};
    std::unique_ptr<IPluginV3> withKeys(creator->createPlugin("node", &keys, TensorRTPhase::kBUILD));
    check(withKeys != nullptr, "plugin_version / plugin_namespace fields are accepted and ignored");

    std::vector<PluginField> bad{{"fixed_rr", &unknownValue, PluginFieldType::kINT32, 1}};
    PluginFieldCollection badFc{1, bad.data()};
    finder.logger.last.clear();
    std::unique_ptr<IPluginV3> rejected(creator->createPlugin("bad_node", &badFc, TensorRTPhase::kBUILD));
    check(rejected == nullptr, "an unknown field is rejected");
    check(finder.logger.last.find("unknown attribute fixed_rr") != std::string::npos
            && finder.logger.last.find("bad_node") != std::string::npos,
        "the rejection is logged through the logger finder: \"" + finder.logger.last + "\"");

    int32_t const badSplit = 2;
    std::vector<PluginField> badMode{{ATM_TOKEN_MERGE_ATTR_SPLIT_MODE, &badSplit, PluginFieldType::kINT32, 1}};
    PluginFieldCollection badModeFc{1, badMode.data()};
    std::unique_ptr<IPluginV3> rejectedMode(creator->createPlugin("node", &badModeFc, TensorRTPhase::kBUILD));
    check(rejectedMode == nullptr, "split_mode = 2 is rejected");
}

void checkInterfaces(IPluginV3* plugin)
{
    check(coreOf(plugin) != nullptr && buildOf(plugin) != nullptr && runtimeOf(plugin) != nullptr,
        "core, build and runtime capabilities");
    check(std::strcmp(coreOf(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0, "core interface kind");
    check(std::strcmp(buildOf(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, "build interface kind");
    check(std::strcmp(runtimeOf(plugin)->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "runtime interface kind");
    check(std::strcmp(coreOf(plugin)->getPluginName(), ATM_TOKEN_MERGE_PLUGIN_NAME) == 0
            && std::strcmp(coreOf(plugin)->getPluginVersion(), ATM_TOKEN_MERGE_PLUGIN_VERSION) == 0
            && std::strcmp(coreOf(plugin)->getPluginNamespace(), ATM_TOKEN_MERGE_PLUGIN_NAMESPACE) == 0,
        "plugin name / version / namespace match the creator");
    check(buildOf(plugin)->getNbOutputs() == 3, "3 outputs");
}

void checkTypes(IPluginV3OneBuild* build)
{
    for (DataType t : {DataType::kFLOAT, DataType::kHALF})
    {
        DataType const in[3] = {t, DataType::kFLOAT, t};
        DataType out[3] = {};
        int32_t const rc = build->getOutputDataTypes(out, 3, in, 3);
        check(rc == 0 && out[0] == t && out[1] == DataType::kFLOAT && out[2] == DataType::kINT32,
            std::string("output types for ") + (t == DataType::kFLOAT ? "float32" : "float16")
                + ": like x, float32, int32 (the size tensor type every header documents)");
    }
}

void checkFormats(IPluginV3OneBuild* build)
{
    auto combo = [](DataType x, DataType size, DataType metric, DataType xOut, DataType sizeOut, DataType k) {
        std::vector<DynamicPluginTensorDesc> io{dynDesc({2, 9, 4}, x), dynDesc({2, 9}, size), dynDesc({2, 9, 8}, metric),
            dynDesc({2, 9, 4}, xOut), dynDesc({2, 9}, sizeOut), dynDesc({}, k)};
        return io;
    };
    auto accepts = [&](std::vector<DynamicPluginTensorDesc> const& io) {
        for (int32_t pos = 0; pos < 6; ++pos)
        {
            if (!build->supportsFormatCombination(pos, io.data(), 3, 3))
            {
                return false;
            }
        }
        return true;
    };
    DataType const F = DataType::kFLOAT, H = DataType::kHALF, I64 = DataType::kINT64, I32 = DataType::kINT32;
    check(accepts(combo(F, F, F, F, F, I32)), "accepts float32 x/metric/x_out, float32 sizes, int32 count");
    check(accepts(combo(H, F, H, H, F, I32)), "accepts float16 x/metric/x_out, float32 sizes, int32 count");
    check(!accepts(combo(F, F, H, F, F, I32)), "rejects metric type != x type");
    check(!accepts(combo(H, H, H, H, F, I32)), "rejects float16 size");
    check(!accepts(combo(F, F, F, F, F, I64)), "rejects an int64 count");
    check(!accepts(combo(DataType::kBF16, F, DataType::kBF16, DataType::kBF16, F, I32)), "rejects bfloat16 x");
    std::vector<DynamicPluginTensorDesc> hwc = combo(F, F, F, F, F, I32);
    hwc[0].desc.format = TensorFormat::kHWC;
    check(!build->supportsFormatCombination(0, hwc.data(), 3, 3), "rejects a non-linear format");
}

void checkShapes(IPluginCreatorV3One* creator)
{
    struct Case
    {
        float threshold;
        int32_t fixedR;
        int32_t numProtected;
        int64_t n;
        bool constantN;
        int64_t expectedOpt; // fixed r: K itself
        char const* what;
        int32_t optNumTokens;
        int32_t maxNumTokens;
        int64_t expectedUpper; // adaptive only
    };
    // DeiT-S: N = 197, P = 1 -> M = 196, at most floor(M / 2) = 98 merges (ToMe's cap).
    Case const cases[] = {
        {1.0f, 16, 1, 197, true, 181, "fixed r = 16: K = N - 16, a constant", -1, -1, 0},
        {1.0f, 500, 1, 197, true, 99, "fixed r > floor(M / 2): K = N - 98", -1, -1, 0},
        {1.0f, 500, 1, 198, true, 100, "M = 197 odd: the cap is floor(M / 2) = 98, K = N - 98", -1, -1, 0},
        {0.9f, 4, 2, 3, true, 3, "fixed r, N - P = 1, P even (no B token): K = N", -1, -1, 0},
        {0.9f, 4, 1, 2, true, 2, "fixed r, N - P = 1, P odd (no A token): K = N", -1, -1, 0},
        {1.0f, 16, 1, 150, false, 134, "fixed r after an adaptive merge: K = N - 16, an expression of N", 120, 197, 0},
        {0.9f, -1, 1, 197, true, 148, "threshold: opt = N - floor(floor(M / 2) / 2), upper = N", -1, -1, 197},
        {0.9f, -1, 1, 4, true, 4, "threshold, M = 3: floor(floor(3 / 2) / 2) = 0, opt = N", -1, -1, 4},
        {0.9f, -1, 1, 197, true, 120, "opt_num_tokens set: opt = its value", 120, 197, 197},
        {0.9f, -1, 1, 150, false, 120, "N from an earlier merge, opt_num_tokens set: opt = its value", 120, -1, 150},
        {0.9f, -1, 1, 150, false, 2, "N from an earlier merge, no opt_num_tokens: a constant (P + 1), never N", -1, -1,
            150},
        {0.9f, -1, 1, 150, false, 120, "N from an earlier merge, max_num_tokens set: upper = max_num_tokens", 120, 197,
            197},
    };
    for (Case const& c : cases)
    {
        Fields f(c.threshold, c.fixedR, 0, c.numProtected, c.optNumTokens, c.maxNumTokens);
        PluginFieldCollection const fc = f.collection();
        std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
        if (!plugin)
        {
            check(false, std::string("createPlugin for ") + c.what);
            continue;
        }
        BuilderImpl impl;
        Builder builder(&impl);
        DimsExprs in[3];
        in[0].nbDims = 3;
        in[0].d[0] = impl.input(64, false);
        in[0].d[1] = impl.input(c.n, c.constantN);
        in[0].d[2] = impl.input(384, true);
        in[1].nbDims = 2;
        in[1].d[0] = in[0].d[0];
        in[1].d[1] = in[0].d[1];
        in[2].nbDims = 3;
        in[2].d[0] = in[0].d[0];
        in[2].d[1] = in[0].d[1];
        in[2].d[2] = impl.input(64, true);
        DimsExprs out[3];
        int32_t const rc = buildOf(plugin.get())->getOutputShapes(in, 3, nullptr, 0, out, 3, builder);
        bool const shaped = rc == 0 && out[0].nbDims == 3 && out[1].nbDims == 2 && out[2].nbDims == 0
            && out[0].d[0] == in[0].d[0] && out[0].d[2] == in[0].d[2] && out[1].d[0] == in[0].d[0]
            && out[1].d[1] == out[0].d[1];
        if (c.fixedR >= 0) // K from N: no size tensor, a constant exactly when N is
        {
            bool const plain = impl.decl.outputIndex == -1 && shaped && !out[0].d[1]->isSizeTensor()
                && valueOf(out[0].d[1]) == c.expectedOpt && out[0].d[1]->isConstant() == c.constantN;
            check(plain,
                std::string(c.what) + " (K " + (shaped ? std::to_string(valueOf(out[0].d[1])) : "?")
                    + ", declared output " + std::to_string(impl.decl.outputIndex) + "; outputs [B, K, C], [B, K], scalar)");
            continue;
        }
        bool const declared
            = impl.decl.outputIndex == 2 && impl.decl.upper == c.expectedUpper && impl.decl.opt == c.expectedOpt;
        check(declared && shaped && out[0].d[1]->isSizeTensor(),
            std::string(c.what) + " (declared output " + std::to_string(impl.decl.outputIndex) + ", opt "
                + std::to_string(impl.decl.opt) + ", upper " + std::to_string(impl.decl.upper)
                + "; outputs [B, K, C], [B, K], scalar K)");
    }

    Fields f(1.0f, 4, 0, 5);
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
    BuilderImpl impl;
    Builder builder(&impl);
    DimsExprs in[3];
    in[0].nbDims = 3;
    in[0].d[0] = impl.input(2, true);
    in[0].d[1] = impl.input(5, true);
    in[0].d[2] = impl.input(8, true);
    in[1].nbDims = 2;
    in[1].d[0] = in[0].d[0];
    in[1].d[1] = in[0].d[1];
    in[2] = in[0];
    DimsExprs out[3];
    check(plugin && buildOf(plugin.get())->getOutputShapes(in, 3, nullptr, 0, out, 3, builder) != 0,
        "getOutputShapes fails when num_protected >= N");
}

//! N from an earlier merge: TensorRT may report its max as -1. max_num_tokens bounds it (and caps
//! a larger reported max); with neither, configure fails and the workspace is 0, both logged.
void checkUnknownMaxN(IPluginCreatorV3One* creator, Finder& finder, std::vector<DynamicPluginTensorDesc> in,
    std::vector<DynamicPluginTensorDesc> const& out)
{
    auto workspaceFor = [](int64_t n) {
        atm_token_merge_params params = atmParams(64, n, 1, -1, 0.5f, ATM_DTYPE_FLOAT16);
        return (atm_token_merge_workspace_size(&params) + 7) / 8 * 8 + sizeof(int64_t);
    };
    auto withMaxN = [&](int64_t maxN) {
        for (auto& d : in)
        {
            d.desc.dims.d[1] = -1;
            d.min.d[1] = 2;
            d.opt.d[1] = 120;
            d.max.d[1] = maxN;
        }
        return in;
    };
    Fields bounded(0.5f, -1, 1, 1, -1, 197);
    PluginFieldCollection const fcBounded = bounded.collection();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fcBounded, TensorRTPhase::kBUILD));
    IPluginV3OneBuild* build = buildOf(plugin.get());
    std::vector<DynamicPluginTensorDesc> const unknown = withMaxN(-1);
    check(build->configurePlugin(unknown.data(), 3, out.data(), 3) == 0
            && build->getWorkspaceSize(unknown.data(), 3, out.data(), 3) == workspaceFor(197),
        "max N unknown (-1): configure accepts it and the workspace is sized for max_num_tokens = 197");
    std::vector<DynamicPluginTensorDesc> const larger = withMaxN(300);
    check(build->configurePlugin(larger.data(), 3, out.data(), 3) == 0
            && build->getWorkspaceSize(larger.data(), 3, out.data(), 3) == workspaceFor(197),
        "a reported max N above max_num_tokens is capped at it");
    std::vector<DynamicPluginTensorDesc> const smaller = withMaxN(150);
    check(build->getWorkspaceSize(smaller.data(), 3, out.data(), 3) == workspaceFor(150),
        "a reported max N below max_num_tokens is used as it is");

    Fields unbounded(0.5f, -1, 1, 1);
    PluginFieldCollection const fcUnbounded = unbounded.collection();
    std::unique_ptr<IPluginV3> blind(creator->createPlugin("node", &fcUnbounded, TensorRTPhase::kBUILD));
    finder.logger.last.clear();
    bool const refused = buildOf(blind.get())->configurePlugin(unknown.data(), 3, out.data(), 3) != 0;
    bool const logged = finder.logger.last.find(ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS) != std::string::npos;
    finder.logger.last.clear();
    size_t const workspace = buildOf(blind.get())->getWorkspaceSize(unknown.data(), 3, out.data(), 3);
    check(refused && logged && workspace == 0
            && finder.logger.last.find(ATM_TOKEN_MERGE_ATTR_MAX_NUM_TOKENS) != std::string::npos,
        "max N unknown and no max_num_tokens: configure fails and the workspace is 0, both logged: \""
            + finder.logger.last + "\"");
}

void checkConfigure(IPluginCreatorV3One* creator, Finder& finder)
{
    Fields f(0.5f, -1, 1, 1);
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
    IPluginV3OneBuild* build = buildOf(plugin.get());
    IPluginV3OneRuntime* runtime = runtimeOf(plugin.get());

    std::vector<DynamicPluginTensorDesc> in{dynDesc({-1, 197, 384}, DataType::kHALF),
        dynDesc({-1, 197}, DataType::kFLOAT), dynDesc({-1, 197, 64}, DataType::kHALF)};
    for (auto& d : in)
    {
        d.min.d[0] = 1;
        d.opt.d[0] = 32;
        d.max.d[0] = 64;
    }
    std::vector<DynamicPluginTensorDesc> out{dynDesc({-1, -1, 384}, DataType::kHALF),
        dynDesc({-1, -1}, DataType::kFLOAT), dynDesc({}, DataType::kINT32)};
    check(build->configurePlugin(in.data(), 3, out.data(), 3) == 0, "configurePlugin accepts a dynamic batch");

    atm_token_merge_params params = atmParams(64, 197, 1, -1, 0.5f, ATM_DTYPE_FLOAT16);
    size_t const kernels = atm_token_merge_workspace_size(&params);
    size_t const expected = (kernels + 7) / 8 * 8 + sizeof(int64_t); // + the int64 count slot
    size_t const got = build->getWorkspaceSize(in.data(), 3, out.data(), 3);
    check(got == expected && kernels > 0,
        "getWorkspaceSize = kernel library size for the max shapes + the count slot (" + std::to_string(got) + " bytes)");

    checkUnknownMaxN(creator, finder, in, out);

    std::vector<DynamicPluginTensorDesc> mixed = in;
    mixed[2].desc.type = DataType::kFLOAT;
    check(build->configurePlugin(mixed.data(), 3, out.data(), 3) != 0, "configurePlugin rejects mixed x/metric types");
    std::vector<DynamicPluginTensorDesc> wrongN = in;
    wrongN[1].desc.dims.d[1] = 196;
    check(build->configurePlugin(wrongN.data(), 3, out.data(), 3) != 0, "configurePlugin rejects size with another N");

    PluginTensorDesc concrete[3] = {in[0].desc, in[1].desc, in[2].desc};
    for (auto& d : concrete)
    {
        d.dims.d[0] = 8;
    }
    PluginTensorDesc outConcrete[3] = {out[0].desc, out[1].desc, out[2].desc};
    check(runtime->onShapeChange(concrete, 3, outConcrete, 3) == 0, "onShapeChange accepts B = 8");
    concrete[2].dims.d[0] = 7;
    check(runtime->onShapeChange(concrete, 3, outConcrete, 3) != 0, "onShapeChange rejects a batch mismatch");
}

void checkSerialization(IPluginCreatorV3One* creator)
{
    Fields f(0.8125f, 12, 1, 2);
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> original(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
    PluginFieldCollection const* saved = runtimeOf(original.get())->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("node", saved, TensorRTPhase::kRUNTIME));
    float t = 0;
    int32_t r = 0, s = 0, p = 0;
    bool const ok = restored && readFields(runtimeOf(restored.get())->getFieldsToSerialize(), &t, &r, &s, &p);
    check(ok && t == 0.8125f && r == 12 && s == 1 && p == 2, "getFieldsToSerialize -> createPlugin(kRUNTIME) round trip");

    std::unique_ptr<IPluginV3> cloned(original->clone());
    std::unique_ptr<IPluginV3> attached(runtimeOf(original.get())->attachToContext(nullptr));
    original.reset(); // the copies must not point into the original's storage
    bool const cloneOk = cloned && readFields(runtimeOf(cloned.get())->getFieldsToSerialize(), &t, &r, &s, &p)
        && t == 0.8125f && r == 12 && s == 1 && p == 2;
    check(cloneOk, "clone() keeps the attributes in its own storage");
    bool const attachedOk = attached && readFields(runtimeOf(attached.get())->getFieldsToSerialize(), &t, &r, &s, &p)
        && t == 0.8125f && r == 12;
    check(attachedOk, "attachToContext() returns an independent copy");
    char const* meta = attached ? buildOf(attached.get())->getMetadataString() : nullptr;
    check(meta != nullptr && std::string(meta).find(ATM_TOKEN_MERGE_ATTR_FIXED_R "=12") != std::string::npos,
        std::string("metadata string: ") + (meta ? meta : "(null)"));
}

//! AdaMerge: its fields round-trip, are validated, the intensity rule declares a size tensor, and
//! the salience weighting grows the workspace by exactly what the kernel library asks for.
void checkAdaMerge(IPluginCreatorV3One* creator, Finder& finder)
{
    auto create = [&](Fields& f) {
        PluginFieldCollection const fc = f.collection();
        return std::unique_ptr<IPluginV3>(creator->createPlugin("ada_node", &fc, TensorRTPhase::kBUILD));
    };
    Fields ada(0.9f, -1, 1, 1);
    ada.adamerge(ATM_TOKEN_MERGE_WEIGHTING_SALIENCE, 0.5f, 8, 0.25f, 0.125f, 2.0f);
    std::unique_ptr<IPluginV3> plugin = create(ada);
    check(plugin != nullptr, "createPlugin with AdaMerge's fields (salience weighting, intensity rule)");
    if (!plugin)
    {
        return;
    }
    auto const* plug = static_cast<atm::plugin::TokenMergePlugin const*>(plugin.get());
    atm_token_merge_attributes const& a = plug->attributes();
    check(a.weighting == 1 && a.salience_temperature == 0.5f && a.r_max == 8 && a.redundancy_mean == 0.25f
            && a.redundancy_std == 0.125f && a.redundancy_scale == 2.0f,
        "AdaMerge's fields are read into their attributes");
    PluginFieldCollection const* saved = runtimeOf(plugin.get())->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("ada_node", saved, TensorRTPhase::kRUNTIME));
    bool sameAttrs = false;
    if (restored)
    {
        atm_token_merge_attributes const& b
            = static_cast<atm::plugin::TokenMergePlugin const*>(restored.get())->attributes();
        sameAttrs = std::memcmp(&a, &b, sizeof(a)) == 0;
    }
    check(saved != nullptr && saved->nbFields == 12 && sameAttrs,
        "AdaMerge's attributes survive getFieldsToSerialize -> createPlugin(kRUNTIME)");
    char const* meta = buildOf(plugin.get())->getMetadataString();
    check(meta != nullptr && std::string(meta).find(ATM_TOKEN_MERGE_ATTR_WEIGHTING "=1") != std::string::npos
            && std::string(meta).find(ATM_TOKEN_MERGE_ATTR_R_MAX "=8") != std::string::npos,
        std::string("metadata names the AdaMerge attributes: ") + (meta ? meta : "(null)"));

    // The intensity rule is data-dependent: a size tensor, opt = N - floor(min(r_max, floor(M/2)) / 2).
    BuilderImpl impl;
    Builder builder(&impl);
    DimsExprs in[3];
    in[0].nbDims = 3;
    in[0].d[0] = impl.input(64, false);
    in[0].d[1] = impl.input(197, true);
    in[0].d[2] = impl.input(384, true);
    in[1].nbDims = 2;
    in[1].d[0] = in[0].d[0];
    in[1].d[1] = in[0].d[1];
    in[2] = in[0];
    in[2].d[2] = impl.input(64, true);
    DimsExprs out[3];
    int32_t const rc = buildOf(plugin.get())->getOutputShapes(in, 3, nullptr, 0, out, 3, builder);
    check(rc == 0 && impl.decl.outputIndex == 2 && impl.decl.opt == 193 && impl.decl.upper == 197
            && out[0].d[1]->isSizeTensor(),
        "intensity rule: num_tokens is a size tensor, opt = 197 - floor(min(8, 98) / 2) = 193, upper = N (opt "
            + std::to_string(impl.decl.opt) + ", upper " + std::to_string(impl.decl.upper) + ")");

    std::vector<DynamicPluginTensorDesc> ins{dynDesc({64, 197, 384}, DataType::kHALF),
        dynDesc({64, 197}, DataType::kFLOAT), dynDesc({64, 197, 64}, DataType::kHALF)};
    std::vector<DynamicPluginTensorDesc> outs{dynDesc({64, -1, 384}, DataType::kHALF),
        dynDesc({64, -1}, DataType::kFLOAT), dynDesc({}, DataType::kINT32)};
    atm_token_merge_params params = atmParams(64, 197, 1, -1, 0.9f, ATM_DTYPE_FLOAT16);
    size_t const atmBytes = atm_token_merge_workspace_size(&params);
    params.weighting = 1;
    params.salience_temperature = 0.5f;
    params.r_max = 8;
    params.redundancy_mean = 0.25f;
    params.redundancy_std = 0.125f;
    params.redundancy_scale = 2.0f;
    size_t const adaBytes = atm_token_merge_workspace_size(&params);
    size_t const got = buildOf(plugin.get())->getWorkspaceSize(ins.data(), 3, outs.data(), 3);
    check(buildOf(plugin.get())->configurePlugin(ins.data(), 3, outs.data(), 3) == 0 && adaBytes > atmBytes
            && got == (adaBytes + 7) / 8 * 8 + sizeof(int64_t),
        "salience weighting: the workspace grows (" + std::to_string(atmBytes) + " -> " + std::to_string(got)
            + " bytes) to the kernel library's size + the count slot");

    struct Bad
    {
        int32_t weighting;
        float temperature;
        int32_t rMax;
        float stdDev;
        char const* reason;
    };
    Bad const bad[] = {
        {2, 1.0f, -1, 1.0f, ATM_TOKEN_MERGE_ATTR_WEIGHTING " must be"},
        {1, 0.0f, -1, 1.0f, ATM_TOKEN_MERGE_ATTR_SALIENCE_TEMPERATURE " must be > 0"},
        {0, 1.0f, -2, 1.0f, ATM_TOKEN_MERGE_ATTR_R_MAX " must be >= -1"},
        {0, 1.0f, 4, 0.0f, ATM_TOKEN_MERGE_ATTR_REDUNDANCY_STD " must be > 0"},
    };
    for (Bad const& b : bad)
    {
        Fields f(0.9f, -1, 0, 1);
        f.adamerge(b.weighting, b.temperature, b.rMax, 0.0f, b.stdDev, 1.0f);
        finder.logger.last.clear();
        std::unique_ptr<IPluginV3> rejected = create(f);
        check(rejected == nullptr && finder.logger.last.find(b.reason) != std::string::npos,
            std::string("rejected with the reason \"") + b.reason + "\": \"" + finder.logger.last + "\"");
    }
}

void checkEnqueueErrors(IPluginCreatorV3One* creator, Finder& finder)
{
    Fields f(1.0f, 2, 0, 1);
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
    IPluginV3OneRuntime* runtime = runtimeOf(plugin.get());
    PluginTensorDesc in[3] = {dynDesc({2, 1, 4}, DataType::kFLOAT).desc, dynDesc({2, 1}, DataType::kFLOAT).desc,
        dynDesc({2, 1, 8}, DataType::kFLOAT).desc};
    PluginTensorDesc out[3] = {in[0], in[1], dynDesc({}, DataType::kINT32).desc};
    void const* inputs[3] = {nullptr, nullptr, nullptr};
    void* outputs[3] = {nullptr, nullptr, nullptr};
    finder.logger.last.clear();
    int32_t const rc = runtime->enqueue(in, out, inputs, outputs, nullptr, nullptr);
    check(rc != 0 && finder.logger.last.find(ATM_TOKEN_MERGE_ATTR_NUM_PROTECTED) != std::string::npos,
        "enqueue refuses N = P = 1 without launching and logs why: \"" + finder.logger.last + "\"");

    // Without a GPU the launch itself fails: enqueue must report that, not crash. (With a GPU
    // these host pointers would be dereferenced by the kernels, so the check is skipped.)
    int devices = 0;
    if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0)
    {
        std::printf("skip enqueue-without-device check: a CUDA device is present\n");
        return;
    }
    in[0] = dynDesc({2, 9, 4}, DataType::kFLOAT).desc;
    in[1] = dynDesc({2, 9}, DataType::kFLOAT).desc;
    in[2] = dynDesc({2, 9, 8}, DataType::kFLOAT).desc;
    std::vector<float> host(2 * 9 * 8);
    std::vector<int64_t> workspace(1 << 16);
    void const* hostInputs[3] = {host.data(), host.data(), host.data()};
    void* hostOutputs[3] = {host.data(), host.data(), workspace.data()};
    finder.logger.last.clear();
    int32_t const launched = runtime->enqueue(in, out, hostInputs, hostOutputs, workspace.data(), nullptr);
    check(launched != 0 && finder.logger.last.find("CUDA error") != std::string::npos,
        "without a device, enqueue returns an error and logs it: \"" + finder.logger.last + "\"");
}

} // namespace

int main()
{
    std::printf("TokenMerge plugin harness, TensorRT headers %d.%d.%d\n", NV_TENSORRT_MAJOR, NV_TENSORRT_MINOR,
        NV_TENSORRT_PATCH);
    Finder finder;
    setLoggerFinder(&finder);
    IPluginCreatorV3One* creator = creatorFromEntryPoint();
    if (creator == nullptr)
    {
        return 1;
    }
    checkCreation(creator, finder);
    Fields f(0.9f, -1, 0, 1);
    PluginFieldCollection const fc = f.collection();
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("node", &fc, TensorRTPhase::kBUILD));
    check(plugin != nullptr, "createPlugin with the ONNX parser's fields");
    if (plugin)
    {
        checkInterfaces(plugin.get());
        checkTypes(buildOf(plugin.get()));
        checkFormats(buildOf(plugin.get()));
    }
    checkShapes(creator);
    checkConfigure(creator, finder);
    checkSerialization(creator);
    checkAdaMerge(creator, finder);
    checkEnqueueErrors(creator, finder);
    setLoggerFinder(nullptr);
    std::printf("%d check(s) failed\n", gFailures);
    return gFailures;
}

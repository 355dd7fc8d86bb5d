# Checks RecurrentLayers.jl's MultiplicativeLSTMCell and MultiplicativeLSTM against the golden vectors
# that `python -m mlstm_spec.golden` writes to tests/data/golden/ (see docs/interop.md).
#
#   julia --project=docs/julia -e 'using Pkg; Pkg.instantiate()'     # once
#   julia --project=docs/julia docs/julia/check_golden.jl [tests/data/golden]
#
# Prints one line per case (worst relative error of the outputs, final state and gradients, or the
# error that stopped the case), then a summary; exits with status 1 if any case failed.
#
# Julia cannot be installed on the project's machines: this script was checked line by line against
# the package sources, not run. Sources read: RecurrentLayers.jl 0.3.4 (tag v0.3.4, commit bb83555),
# Flux 0.16.5 and 0.16.11, SafeTensors.jl 1.1.0 and 1.2.1, Zygote 0.6.77, 0.7.10 and 0.7.12 (which
# Flux brings in). docs/julia/Project.toml admits exactly RecurrentLayers 0.3.4, Flux 0.16.5-0.16.11
# and SafeTensors 1.1.0-1.2.1. Line numbers below are at the first tag named for each package.

using Flux            # Flux.gradient (Zygote) and Flux.f64
using RecurrentLayers # MultiplicativeLSTMCell, MultiplicativeLSTM
using SafeTensors     # SafeTensors.deserialize: tensors keep the shapes and indices NumPy wrote

# The conformance suite's table (mlstm_spec/conformance/tolerances.py), with its error metric:
# max|actual - expected| / max(max|expected|, FLOOR). RecurrentLayers.jl uses NNlib's sigmoid_fast and
# tanh_fast, whose errors are a few ulps, far inside these budgets.
const TOLERANCE = Dict("float32" => 1e-3, "float64" => 1e-10)
const FLOOR = 1e-2
const PARAMS = ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh")
const BIAS_FLAGS = Dict("bias_ih" => "bias", "bias_hh" => "recurrent_bias", "bias_mh" => "multiplicative_bias")

# The cases this script expects, one file `<name>.safetensors` each. A missing file or one not listed
# here is a failure: a golden set that changed must be reviewed here too.
const CASES = (
    "00_float32_unbatched_T1_add_nobias",
    "01_float64_B2_T5_mult_nobias",
    "02_float64_unbatched_T5_add_bias-m_indep",
    "03_float32_B2_T1_mult_bias-m_indep",
    "04_float64_B2_T1_add_bias-h_indep",
    "05_float32_unbatched_T5_mult_bias-h_indep",
    "06_float32_B2_T5_add_bias-hm",
    "07_float64_unbatched_T1_mult_bias-hm",
    "08_float32_B2_T5_add_bias-i_indep",
    "09_float64_unbatched_T1_mult_bias-i_indep",
    "10_float64_B2_T1_add_bias-im",
    "11_float32_unbatched_T5_mult_bias-im",
    "12_float64_unbatched_T5_add_bias-ih",
    "13_float32_B2_T1_mult_bias-ih",
    "14_float32_unbatched_T1_add_bias-ihm_indep",
    "15_float64_B2_T5_mult_bias-ihm_indep",
)

# The header metadata the script reads, and the format it understands.
const META_KEYS = ("format", "format_version", "case", "dtype", "integration_mode", "batched",
    "bias", "recurrent_bias", "multiplicative_bias", "independent_recurrence", "I", "H", "T", "B")
const FORMAT = ("mlstm-spec.golden", "1")

# Every tensor besides the parameters and their gradients, with its shape as stored (NumPy's order,
# which SafeTensors.jl keeps): letters are the metadata's sizes, and "B" is present only in batched
# cases. A parameter's shape is checked against the field RecurrentLayers.jl builds for it, and
# grad.<parameter> must have its parameter's shape.
const SHAPES = (
    "xs" => "B T I", "h0" => "B H", "c0" => "B H",
    "hs" => "B T H", "h_T" => "B H", "c_T" => "B H",
    "d_hs" => "B T H", "d_h_T" => "B H", "d_c_T" => "B H",
    "grad.x" => "B T I", "grad.h0" => "B H", "grad.c0" => "B H",
    "layout_probe" => "2 3",
)

# ---- workaround for RecurrentLayers.jl 0.3.4's in-place bias ----
#
# src/base_functions.jl lines 9-14: `dense_proj(weight::AbstractMatrix, x, bias::AbstractVector)` forms
# `weight * x` and adds the bias into it in place with `add_bias!` (lines 16-30, an element-by-element
# `+=` loop). Zygote's adjoint for setindex! (Zygote src/lib/array.jl lines 70-82) throws "Mutating
# arrays is not supported" on the backward pass, so Flux.gradient fails for every case with `bias_ih`,
# `bias_mh`, or `bias_hh` on a full weight_hh (12 of the 16). Upstream merged a fix after 0.3.4 (pull
# request #180, "fix: gradient-breaking mutation, batch bugs"), but no release containing it could be
# read here; so instead of raising the compat bound, this script replaces that one method for its run.
# The replacement forms the same product and adds the same bias element by element, each sum rounded
# once, so forward values are bit-identical to 0.3.4's; it allocates a new array, which Zygote can
# differentiate. Julia replaces a method defined with an identical signature, so this overrides the
# package's method (and would not with a later release that changed the signature: hence the exact
# compat bound on RecurrentLayers in Project.toml).
function RecurrentLayers.dense_proj(weight::AbstractMatrix, inp_or_state::AbstractVecOrMat,
        bias::AbstractVector)
    return weight * inp_or_state .+ bias
end

# ---- comparisons ----

# An array with its length-1 axes dropped keeps its elements in the same order, so if two sizes agree
# after dropping those axes, reshaping one to the other pairs the right elements. Anything else is an
# error: broadcasting a (H, 1, B) result against an expected (H, B) would silently compare (H, B, B)
# pairs. (RecurrentLayers.jl 0.3.4 does return extra length-1 axes: `_ind_rec` with no recurrent bias,
# src/base_functions.jl lines 65-71, turns an (H,) state into an (H, 1) matrix.)
without_singletons(dims) = Tuple(d for d in dims if d != 1)

function conform(actual, expected::AbstractArray, what)
    actual === nothing && error("$what: no value (got nothing)")
    without_singletons(size(actual)) == without_singletons(size(expected)) ||
        error("$what has size $(size(actual)), expected $(size(expected)) (length-1 axes aside)")
    return reshape(actual, size(expected))
end

function relative_error(actual, expected)
    size(actual) == size(expected) || error("comparing size $(size(actual)) with $(size(expected))")
    return maximum(abs.(Float64.(actual) .- Float64.(expected)); init=0.0) /
           max(maximum(abs.(Float64.(expected)); init=0.0), FLOOR)
end

compare!(errors, name, actual, expected) = (errors[name] = relative_error(conform(actual, expected, name), expected))

# The files hold NumPy row-major arrays by logical index: xs is (B, T, I), a state (B, H). Julia's
# recurrent layers are feature-first, (I, T, B) and (H, B): reversing the axes is the whole conversion.
# Parameters are (rows, columns) on both sides and need nothing.
reverse_axes(a::AbstractArray) = permutedims(a, ndims(a):-1:1)
reverse_axes(a::AbstractVector) = a

# ---- reading a case ----

flag(meta, name) = parse(Bool, meta[name])

function stored_shape(spec, meta)
    batched = flag(meta, "batched")
    dims = Int[]
    for letter in split(spec)
        letter == "B" && !batched && continue
        number = tryparse(Int, letter)
        push!(dims, number === nothing ? parse(Int, meta[String(letter)]) : number)
    end
    return Tuple(dims)
end

# SafeTensors.jl 1.1.0 (src/SafeTensors.jl: `deserialize` lines 230-236, `.metadata` line 177, and
# `_tensorslice` lines 196-202, which wraps the row-major data in a PermutedDimsArray so that each
# tensor has NumPy's shape and logical indices) gives the metadata as Dict{String,String}.
function read_case(path)
    file = SafeTensors.deserialize(path)
    meta = file.metadata
    meta === nothing && error("$path has no header metadata")
    absent = [key for key in META_KEYS if !haskey(meta, key)]
    isempty(absent) || error("$path: metadata lacks $(join(absent, ", "))")
    (meta["format"], meta["format_version"]) == FORMAT ||
        error("$path: format $(meta["format"]) version $(meta["format_version"]), expected $(FORMAT[1]) version $(FORMAT[2])")
    meta["case"] == first(splitext(basename(path))) || error("$path: metadata names case $(meta["case"])")
    haskey(TOLERANCE, meta["dtype"]) || error("$path: dtype $(meta["dtype"]), expected one of $(sort(collect(keys(TOLERANCE))))")

    tensors = Dict(name => collect(file[name]) for name in keys(file))
    params = [p for p in PARAMS if !haskey(BIAS_FLAGS, p) || flag(meta, BIAS_FLAGS[p])]
    expected_names = Set{String}(first.(SHAPES))
    union!(expected_names, params, ["grad." * p for p in params])
    missing_names = setdiff(expected_names, keys(tensors))
    unexpected = setdiff(keys(tensors), expected_names)
    isempty(missing_names) && isempty(unexpected) ||
        error("$path: tensors missing: $(sort(collect(missing_names))); not expected: $(sort(collect(unexpected)))")
    for (name, spec) in SHAPES
        size(tensors[name]) == stored_shape(spec, meta) ||
            error("$path: $name has size $(size(tensors[name])), expected $(stored_shape(spec, meta))")
    end
    for p in params
        size(tensors["grad.$p"]) == size(tensors[p]) ||
            error("$path: grad.$p has size $(size(tensors["grad.$p"])), $p $(size(tensors[p]))")
    end
    probe = tensors["layout_probe"]  # (2, 3) with value 3 * row + column, 0-based, in NumPy
    probe[1, 2] == 1 && probe[2, 1] == 3 ||
        error("$path: SafeTensors.jl did not keep NumPy's logical indices (layout_probe = $probe); " *
              "this script assumes SafeTensors.jl 1.1-1.2 behaviour")
    return meta, tensors, params
end

# A cell or layer with the case's options, holding exactly the stored parameters.
function build(constructor, meta, tensors, params; kwargs...)
    I, H = parse(Int, meta["I"]), parse(Int, meta["H"])
    model = constructor(I => H; bias=flag(meta, "bias"), recurrent_bias=flag(meta, "recurrent_bias"),
        multiplicative_bias=flag(meta, "multiplicative_bias"),
        independent_recurrence=flag(meta, "independent_recurrence"),
        integration_mode=Symbol(meta["integration_mode"]), kwargs...)
    model = meta["dtype"] == "float64" ? Flux.f64(model) : model
    cell = model isa MultiplicativeLSTMCell ? model : model.cell
    for name in params
        field = getfield(cell, Symbol(name))
        size(field) == size(tensors[name]) ||
            error("$name: RecurrentLayers.jl has size $(size(field)), the file $(size(tensors[name]))")
        copyto!(field, tensors[name])
    end
    return model
end

# ---- running ----

# The cell over time: x is (I, T, B) or (I, T); returns hs and the final (h, c). The cell accepts
# (H, B) states (src/cells/multiplicativelstm_cell.jl lines 102-117), so batches run in one call.
function run_cell(cell, x, state)
    outputs = []
    for t in axes(x, 2)
        h, state = cell(selectdim(x, 2, t), state)
        push!(outputs, h)
    end
    return stack(outputs; dims=2), state
end

# The layer's own call, once per batch column. RecurrentLayers.jl 0.3.4's layer call with
# return_state=true (src/generics.jl lines 42-52) asserts typeof(state) == typeof(initialstates(layer)),
# and this cell's initialstates (src/cells/multiplicativelstm_cell.jl lines 119-123) is two length-H
# vectors: a batched (H, B) state fails that assertion. One column at a time the state is two vectors
# and the layer runs its own code (Flux 0.16's `scan`, src/layers/recurrent.jl lines 1-8).
function run_layer(layer, x, h0, c0)
    result = ndims(x) == 2 ? layer(x, (h0, c0)) : nothing
    if ndims(x) == 3
        H, T, B = size(h0, 1), size(x, 2), size(x, 3)
        hs, hT, cT = similar(h0, H, T, B), similar(h0, H, B), similar(c0, H, B)
        for b in 1:B
            out = layer(x[:, :, b], (h0[:, b], c0[:, b]))
            out isa Tuple || error("the layer returned a $(typeof(out)), expected (outputs, (h_T, c_T))")
            hs_b, (hT_b, cT_b) = out
            hs[:, :, b] = conform(hs_b, view(hs, :, :, b), "hs (layer, batch column $b)")
            hT[:, b] = conform(hT_b, view(hT, :, b), "h_T (layer, batch column $b)")
            cT[:, b] = conform(cT_b, view(cT, :, b), "c_T (layer, batch column $b)")
        end
        result = (hs, (hT, cT))
    end
    result isa Tuple || error("MultiplicativeLSTM(...; return_state=true) returned a $(typeof(result)), " *
                              "expected (outputs, (h_T, c_T))")
    return result
end

function check_case(path)
    meta, tensors, params = read_case(path)
    x, h0, c0 = reverse_axes(tensors["xs"]), reverse_axes(tensors["h0"]), reverse_axes(tensors["c0"])
    d_hs, d_hT, d_cT = reverse_axes(tensors["d_hs"]), reverse_axes(tensors["d_h_T"]), reverse_axes(tensors["d_c_T"])
    expected(name) = reverse_axes(tensors[name])
    errors = Dict{String, Float64}()

    cell = build(MultiplicativeLSTMCell, meta, tensors, params)
    hs, (hT, cT) = run_cell(cell, x, (h0, c0))
    compare!(errors, "hs (cell)", hs, expected("hs"))
    compare!(errors, "h_T (cell)", hT, expected("h_T"))
    compare!(errors, "c_T (cell)", cT, expected("c_T"))

    layer = build(MultiplicativeLSTM, meta, tensors, params; return_state=true)
    hs_layer, (hT_layer, cT_layer) = run_layer(layer, x, h0, c0)
    compare!(errors, "hs (layer)", hs_layer, expected("hs"))
    compare!(errors, "h_T (layer)", hT_layer, expected("h_T"))
    compare!(errors, "c_T (layer)", cT_layer, expected("c_T"))

    # The loss whose gradients the file holds: sum(hs .* d_hs) + sum(h_T .* d_h_T) + sum(c_T .* d_c_T),
    # accumulated step by step (no array mutation, so Zygote differentiates it). Each product is taken
    # after reshaping the cell's output to the cotangent's shape, so an extra length-1 axis cannot
    # broadcast into a larger array.
    function loss(cell, x, h0, c0)
        state, total = (h0, c0), zero(eltype(h0))
        for t in axes(x, 2)
            d_h = selectdim(d_hs, 2, t)
            h, state = cell(selectdim(x, 2, t), state)
            total += sum(reshape(h, size(d_h)) .* d_h)
        end
        h_last, c_last = state  # names unused outside: a closure assigning an outer local would box it
        return total + sum(reshape(h_last, size(d_hT)) .* d_hT) + sum(reshape(c_last, size(d_cT)) .* d_cT)
    end
    # Flux.gradient calls Zygote.gradient (Flux 0.16.5 src/gradient.jl lines 31-45).
    g_cell, g_x, g_h0, g_c0 = Flux.gradient(loss, cell, x, h0, c0)
    for name in params
        g = g_cell === nothing ? nothing : getfield(g_cell, Symbol(name))
        # Zygote returns nothing for a gradient that is structurally zero.
        compare!(errors, "grad.$name", g === nothing ? zero(tensors["grad.$name"]) : g, tensors["grad.$name"])
    end
    compare!(errors, "grad.x", g_x, expected("grad.x"))
    compare!(errors, "grad.h0", g_h0, expected("grad.h0"))
    compare!(errors, "grad.c0", g_c0, expected("grad.c0"))
    return meta, errors
end

one_line(err) = (text = join(split(sprint(showerror, err)), " "); length(text) > 300 ? first(text, 300) * " ..." : text)

# One case, never throwing: the lines to print and whether it passed.
function report_case(name, path)
    isfile(path) || return (["$(rpad(name, 48))FAIL (missing file $path)"], false)
    meta, errors = try
        check_case(path)
    catch err
        err isa InterruptException && rethrow()
        return (["$(rpad(name, 48))FAIL (error: $(one_line(err)))"], false)
    end
    tolerance = TOLERANCE[meta["dtype"]]
    worst_name, worst = "", -1.0
    for (quantity, err) in sort(collect(errors))
        err > worst && ((worst_name, worst) = (quantity, err))
    end
    passed = worst <= tolerance
    lines = ["$(rpad(name, 48))$(passed ? "pass" : "FAIL")  worst $worst_name = $(round(worst; sigdigits=3))" *
             "  (tolerance $tolerance)"]
    for (quantity, err) in sort(collect(errors))
        err > tolerance && push!(lines, "    $quantity = $err")
    end
    return lines, passed
end

function main(dir)
    present = isdir(dir) ? [first(splitext(f)) for f in readdir(dir) if endswith(f, ".safetensors")] : String[]
    names = [collect(CASES); sort(setdiff(present, CASES))]
    failures = 0
    for name in names
        lines, passed = name in CASES ? report_case(name, joinpath(dir, name * ".safetensors")) :
            (["$(rpad(name, 48))FAIL (a golden file this script does not list in CASES)"], false)
        foreach(println, lines)
        failures += !passed
    end
    println(failures == 0 ? "all $(length(names)) cases agree" : "$failures of $(length(names)) cases FAILED")
    return failures
end

exit(main(isempty(ARGS) ? joinpath(@__DIR__, "..", "..", "tests", "data", "golden") : ARGS[1]) == 0 ? 0 : 1)

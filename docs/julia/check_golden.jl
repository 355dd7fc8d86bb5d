# Checks RecurrentLayers.jl's MultiplicativeLSTMCell and MultiplicativeLSTM against the golden vectors
# that `python -m mlstm_spec.golden` writes to tests/data/golden/ (see docs/interop.md).
#
#   julia --project=docs/julia -e 'using Pkg; Pkg.instantiate()'     # once
#   julia --project=docs/julia docs/julia/check_golden.jl [tests/data/golden]
#
# Prints one line per case (worst relative error of the outputs, final state and gradients) and exits
# with status 1 if any exceeds the tolerance of its dtype.

using Flux            # Flux.gradient (Zygote) and Flux.f64
using RecurrentLayers # MultiplicativeLSTMCell, MultiplicativeLSTM
using SafeTensors     # SafeTensors.deserialize: tensors keep the shapes and indices NumPy wrote

# The conformance suite's table (mlstm_spec/conformance/tolerances.py), with its error metric:
# max|actual - expected| / max(max|expected|, FLOOR). RecurrentLayers.jl uses NNlib's sigmoid_fast and
# tanh_fast, whose errors are a few ulps, far inside these budgets.
const TOLERANCE = Dict("float32" => 1e-3, "float64" => 1e-10)
const FLOOR = 1e-2
const PARAMS = ("weight_ih", "weight_hh", "weight_mh", "bias_ih", "bias_hh", "bias_mh")

relative_error(actual, expected) =
    maximum(abs.(Float64.(actual) .- Float64.(expected)); init=0.0) /
    max(maximum(abs.(Float64.(expected)); init=0.0), FLOOR)

# The files hold NumPy row-major arrays by logical index: xs is (B, T, I), a state (B, H). Julia's
# recurrent layers are feature-first, (I, T, B) and (H, B): reversing the axes is the whole conversion.
# Parameters are (rows, columns) on both sides and need nothing.
reverse_axes(a::AbstractArray) = permutedims(a, ndims(a):-1:1)
reverse_axes(a::AbstractVector) = a

function read_case(path)
    file = SafeTensors.deserialize(path)
    meta = file.metadata
    tensors = Dict(name => collect(file[name]) for name in keys(file))
    probe = tensors["layout_probe"]  # (2, 3) with value 3 * row + column, 0-based, in NumPy
    size(probe) == (2, 3) && probe[1, 2] == 1 && probe[2, 1] == 3 ||
        error("$path: SafeTensors.jl did not keep NumPy's logical indices (layout_probe = $probe); " *
              "this script assumes SafeTensors.jl >= 1.1 behaviour")
    return meta, tensors
end

# A cell with the case's options, holding exactly the stored parameters.
function build(constructor, meta, tensors; kwargs...)
    T = meta["dtype"] == "float64" ? Float64 : Float32
    I, H = parse(Int, meta["I"]), parse(Int, meta["H"])
    flag(name) = parse(Bool, meta[name])
    model = constructor(I => H; bias=flag("bias"), recurrent_bias=flag("recurrent_bias"),
        multiplicative_bias=flag("multiplicative_bias"),
        independent_recurrence=flag("independent_recurrence"),
        integration_mode=Symbol(meta["integration_mode"]), kwargs...)
    model = T == Float64 ? Flux.f64(model) : model
    cell = model isa MultiplicativeLSTMCell ? model : model.cell
    for name in PARAMS
        haskey(tensors, name) || continue
        field = getfield(cell, Symbol(name))
        size(field) == size(tensors[name]) ||
            error("$name: RecurrentLayers.jl has size $(size(field)), the file $(size(tensors[name]))")
        copyto!(field, tensors[name])
    end
    return model
end

# Runs the cell over time: x is (I, T, B) or (I, T); returns hs (H, T, B) or (H, T) and (h_T, c_T).
function run_cell(cell, x, state)
    outputs = []
    for t in axes(x, 2)
        h, state = cell(selectdim(x, 2, t), state)
        push!(outputs, h)
    end
    return stack(outputs; dims=2), state
end

function check_case(path)
    meta, tensors = read_case(path)
    x, h0, c0 = reverse_axes(tensors["xs"]), reverse_axes(tensors["h0"]), reverse_axes(tensors["c0"])
    d_hs, d_hT, d_cT = reverse_axes(tensors["d_hs"]), reverse_axes(tensors["d_h_T"]), reverse_axes(tensors["d_c_T"])
    errors = Dict{String, Float64}()

    cell = build(MultiplicativeLSTMCell, meta, tensors)
    hs, (hT, cT) = run_cell(cell, x, (h0, c0))
    errors["hs (cell)"] = relative_error(hs, reverse_axes(tensors["hs"]))
    errors["h_T (cell)"] = relative_error(hT, reverse_axes(tensors["h_T"]))
    errors["c_T (cell)"] = relative_error(cT, reverse_axes(tensors["c_T"]))

    layer = build(MultiplicativeLSTM, meta, tensors; return_state=true)
    out = layer(x, (h0, c0))
    out isa Tuple || error("MultiplicativeLSTM(...; return_state=true) returned a $(typeof(out)), " *
                           "expected (outputs, (h_T, c_T))")
    hs_layer, (hT_layer, cT_layer) = out
    errors["hs (layer)"] = relative_error(hs_layer, reverse_axes(tensors["hs"]))
    errors["h_T (layer)"] = relative_error(hT_layer, reverse_axes(tensors["h_T"]))
    errors["c_T (layer)"] = relative_error(cT_layer, reverse_axes(tensors["c_T"]))

    # The loss whose gradients the file holds: sum(hs .* d_hs) + sum(h_T .* d_h_T) + sum(c_T .* d_c_T),
    # accumulated step by step (no array mutation, so Zygote differentiates it).
    function loss(cell, x, h0, c0)
        state, total = (h0, c0), zero(eltype(h0))
        for t in axes(x, 2)
            h, state = cell(selectdim(x, 2, t), state)
            total += sum(h .* selectdim(d_hs, 2, t))
        end
        h_last, c_last = state  # names unused outside: a closure assigning an outer local would box it
        return total + sum(h_last .* d_hT) + sum(c_last .* d_cT)
    end
    g_cell, g_x, g_h0, g_c0 = Flux.gradient(loss, cell, x, h0, c0)
    for name in PARAMS
        haskey(tensors, name) || continue
        g = getfield(g_cell, Symbol(name))
        expected = tensors["grad.$name"]
        errors["grad.$name"] = relative_error(g === nothing ? zero(expected) : g, expected)
    end
    errors["grad.x"] = relative_error(g_x, reverse_axes(tensors["grad.x"]))
    errors["grad.h0"] = relative_error(g_h0, reverse_axes(tensors["grad.h0"]))
    errors["grad.c0"] = relative_error(g_c0, reverse_axes(tensors["grad.c0"]))
    return meta, errors
end

function main(dir)
    files = sort(filter(f -> endswith(f, ".safetensors"), readdir(dir; join=true)))
    isempty(files) && error("no .safetensors files in $dir")
    failures = 0
    for path in files
        meta, errors = check_case(path)
        tolerance = TOLERANCE[meta["dtype"]]
        worst_name, worst = "", -1.0
        for (name, err) in errors
            err > worst && ((worst_name, worst) = (name, err))
        end
        ok = worst <= tolerance
        failures += !ok
        println(rpad(meta["case"], 48), ok ? "pass" : "FAIL", "  worst ", worst_name, " = ",
            round(worst; sigdigits=3), "  (tolerance ", tolerance, ")")
        ok || foreach(((k, v),) -> v > tolerance && println("    ", k, " = ", v), sort(collect(errors)))
    end
    println(failures == 0 ? "all $(length(files)) cases agree" : "$failures of $(length(files)) cases FAILED")
    return failures == 0
end

main(isempty(ARGS) ? joinpath(@__DIR__, "..", "..", "tests", "data", "golden") : ARGS[1]) || exit(1)

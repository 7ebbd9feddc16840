"""Which modules a method edits: the layer grammar, the part names and the default bands."""

import pytest

from lledit.layers import default_layers, parse_layers


def test_layer_grammar():
    assert parse_layers("4-6, 8", 30) == (4, 5, 6, 8)
    assert parse_layers("3, 0,3", 4) == (0, 3)
    assert parse_layers("-1", 4) == (3,)
    assert parse_layers("-3--1", 30) == (27, 28, 29)
    assert parse_layers("20,-1", 30) == (20, 29)
    assert parse_layers("-4 - 1", 4) == (0, 1)
    for text, message in [
        ("2-9", "layer 9 does not exist; the model has 4 layers"),
        ("-5", "layer -5 does not exist"),
        ("two", "cannot read 'two'"),
        ("", "cannot read ''"),
        ("1,,2", "cannot read ''"),
        ("3-1", "runs backwards"),
        ("-1-0", "runs backwards"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_layers(text, 4)


def test_default_bands():
    assert default_layers(30, "lower") == (4, 5, 6, 7, 8)
    assert default_layers(30, "upper") == (21, 22, 23, 24, 25, 26)
    assert default_layers(4, "lower") == (1, 2)
    assert default_layers(4, "upper") == (2, 3)
    assert default_layers(1, "upper") == (0,)
    with pytest.raises(ValueError, match="band"):
        default_layers(30, "middle")


def test_the_handle_resolves_layers_and_parts(tiny):
    arch = tiny.arch
    assert tiny.part_modules("mlp_in") == arch.mlp_in
    assert tiny.part_modules("mlp_out") == (arch.mlp_out,)
    assert tiny.part_modules("mlp") == (*arch.mlp_in, arch.mlp_out)
    assert tiny.edited_modules(None, "mlp_out", "upper") == [
        tiny.layer_module(layer, arch.mlp_out) for layer in (2, 3)
    ]
    assert tiny.edited_modules(None, "mlp", "upper", only="first") == [
        tiny.layer_module(2, path) for path in (*arch.mlp_in, arch.mlp_out)
    ]
    assert tiny.edited_modules("-1", arch.mlp_out, "lower") == [tiny.layer_module(3, arch.mlp_out)]
    with pytest.raises(ValueError, match="part 'nowhere': the model has no module named"):
        tiny.edited_modules("1", "nowhere", "upper")
    # The first child of a decoder layer is a norm or an attention block, not a linear layer.
    child = next(iter(dict(tiny.module(tiny.decoder_layer(1)).named_children())))
    with pytest.raises(ValueError, match=f"part '{child}': .* not a linear layer"):
        tiny.edited_modules("1", child, "upper")

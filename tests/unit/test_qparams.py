import json

import pytest

from exl2conv.qparams import (
    ATTN_OPTIONS, HEAD_OPTIONS, MLP_OPTIONS, QParams, distinct_columns, qp,
)

SMOL_SHAPES = {  # linear -> (K, N) for SmolLM2-135M
    "q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
    "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576),
}


def test_table_sizes_and_distinct_counts():
    assert len(ATTN_OPTIONS) == 19 and len(MLP_OPTIONS) == 17
    assert sorted(HEAD_OPTIONS) == [2, 3, 4, 5, 6, 8]
    attn, _ = distinct_columns(ATTN_OPTIONS)
    mlp, _ = distinct_columns(MLP_OPTIONS)
    assert [len(c) for c in attn] == [14, 14, 15, 14]
    assert [len(c) for c in mlp] == [13, 13, 14]


def test_desc_and_dict_roundtrip():
    q = qp((3, 64, 0.05), (2, 64, 0.95))
    assert q.desc == "0.05:3b_64g/0.95:2b_64g s4"
    assert qp((4, 128, 1)).desc == "1:4b_128g s4"
    d = json.loads(json.dumps(q.to_dict()))
    assert d == {"group_size": {"3": 64, "2": 64}, "bits": [3, 2], "bits_prop": [0.05, 0.95], "scale_bits": 4}
    assert QParams.from_dict(d) == q


@pytest.mark.parametrize("bad", [
    dict(bits=(2, 3), bits_prop=(0.5, 0.5), group_size=(32, 32)),   # ascending
    dict(bits=(4,), bits_prop=(0.9,), group_size=(32,)),              # does not sum to 1
    dict(bits=(7,), bits_prop=(1,), group_size=(32,)),                # no 7-bit kernel
    dict(bits=(4,), bits_prop=(1,), group_size=(48,)),                # not a multiple of 32
])
def test_invalid_qparams_refused(bad):
    with pytest.raises(ValueError):
        QParams(**bad)


def test_layout_examples_from_reference():
    # reference 5.3: K=4096 3b/2b g64 0.05 -> 4 x 3-bit, then 60 x 2-bit
    g = qp((3, 64, 0.05), (2, 64, 0.95)).groups(4096)
    assert [x.bits for x in g] == [3] * 4 + [2] * 60
    # K=11008, 8b g32 .05 / 4b g128 .1 / 3b g128 .85: 18 + 9 + 73, last 3-bit group of 64 rows
    g = qp((8, 32, 0.05), (4, 128, 0.1), (3, 128, 0.85)).groups(11008)
    assert [x.bits for x in g].count(8) == 18 and [x.bits for x in g].count(4) == 9
    assert [x.bits for x in g].count(3) == 73 and g[-1].rows == 64
    assert sum(x.rows for x in g) == 11008
    packed_rows = sum(x.rows * x.bits // 32 for x in g)
    assert packed_rows == 1158
    assert sum(x.rows * x.bits // 32 for x in HEAD_OPTIONS[6].groups(4096)) == 808


def test_total_bits_matches_exllamav2_fixture(fixture_dir):
    m = json.loads((fixture_dir / "exllamav2-0.3.2_measurement.json").read_text())["measurement"]
    checked = 0
    for key, entries in m.items():
        if entries is None:
            continue
        for e in entries:
            total = 0
            for name, (k, n) in SMOL_SHAPES.items():
                if name in e:
                    total += QParams.from_dict(e[name]).total_bits(k, n)
            assert total == e["total_bits"], (key, e)
            checked += 1
    assert checked == 30 * (19 + 17) == 1080


def test_measurement_entries_follow_table_order(fixture_dir):
    m = json.loads((fixture_dir / "exllamav2-0.3.2_measurement.json").read_text())["measurement"]
    attn = m["model.layers.0.self_attn"]
    for row, e in zip(ATTN_OPTIONS, attn):
        assert [QParams.from_dict(e[c]).desc for c in ("q_proj", "k_proj", "v_proj", "o_proj")] == [q.desc for q in row]
    mlp = m["model.layers.0.mlp"]
    for row, e in zip(MLP_OPTIONS, mlp):
        assert [QParams.from_dict(e[c]).desc for c in ("gate_proj", "up_proj", "down_proj")] == [q.desc for q in row]

"""StaticDecoder's CUDA graph (exl2conv/runtime/graphed.py) on the device: on a random packed
Llama of a few layers, the replayed steps give the logits of the same steps run eagerly (the
same kernels on the same inputs) and the greedy tokens of transformers' own generate()."""

import pytest
import torch

from exl2conv import kernels
from exl2conv.runtime import Exl2ForCausalLM
from exl2conv.runtime.graphed import StaticDecoder
from tests.randexl2 import make_random_exl2

pytestmark = pytest.mark.gpu
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    assert kernels.get() is not None, "the CUDA extension did not build"
    folder = make_random_exl2(tmp_path_factory.mktemp("graphed"), 512, 1024, 8, 4, 1024, 3)
    return Exl2ForCausalLM.from_quantized(folder, device="cuda", dtype=torch.float16)


def run(model, graph: bool, prompt, steps: int):
    dec = StaticDecoder(model, 64, graph=graph)
    rows, tokens = [dec.prefill(prompt)[0].float()], []
    for _ in range(steps):
        tokens.append(int(rows[-1].argmax()))
        rows.append(dec.step(torch.tensor([tokens[-1]], device="cuda"))[0].float().clone())
    return torch.stack(rows), tokens, dec


def test_graph_replay_equals_the_eager_step(model):
    prompt = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    eager, eager_tokens, _ = run(model, False, prompt, 16)
    graphed, graphed_tokens, dec = run(model, True, prompt, 16)
    assert dec.graph is not None
    assert graphed_tokens == eager_tokens
    scale = eager.abs().max()
    assert (graphed - eager).abs().max() <= 1e-3 * scale
    with torch.inference_mode():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                             pad_token_id=0)
    ref_tokens = ref[0, prompt.shape[1]:].tolist()  # generate() may stop early at the config's EOS
    assert ref_tokens and graphed_tokens[:len(ref_tokens)] == ref_tokens

"""StaticDecoder's CUDA graph (exl2conv/runtime/graphed.py) on the device: on a random packed
Llama of a few layers, the replayed steps give the logits of the same steps run eagerly (the same
kernels on the same inputs), teacher-forced on one token sequence so that a near tie between two
logits (random weights have them) cannot send the two runs down different continuations."""

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


def stepped(model, graph: bool, prompt: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, StaticDecoder]:
    dec = StaticDecoder(model, 64, graph=graph)
    rows = [dec.prefill(prompt)[0].float().clone()]
    for t in tokens:
        rows.append(dec.step(torch.tensor([t], device="cuda"))[0].float().clone())
    return torch.stack(rows), dec


def test_graph_replay_equals_the_eager_step(model):
    prompt = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    eager, _ = stepped(model, False, prompt, tokens)
    graphed, dec = stepped(model, True, prompt, tokens)
    assert dec.graph is not None
    diff = (graphed - eager).abs().max().item()
    print(f"graph replay against the eager step: max |logit difference| {diff:.3g} "
          f"(largest logit {eager.abs().max().item():.3g})")
    assert diff <= 1e-3 * eager.abs().max().item()


def test_the_check_fails_when_the_graph_replays_a_stale_position(model, monkeypatch):
    """The same comparison with a step that does not advance the position (each replay writes over
    the same cache slot): the logits differ, so the check above can fail."""
    prompt = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    tokens = torch.randint(0, 1024, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    eager, _ = stepped(model, False, prompt, tokens)
    real_step = StaticDecoder.step

    def stale(self, token):
        length = self.length
        out = real_step(self, token)
        self.length = max(length, 12)  # stays at the prompt's end
        return out

    monkeypatch.setattr(StaticDecoder, "step", stale)
    graphed, _ = stepped(model, True, prompt, tokens)
    assert (graphed - eager).abs().max().item() > 1e-2 * eager.abs().max().item()

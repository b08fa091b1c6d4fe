"""``forward_in_steps``: a model's forward as steps of about one layer (for a server that reads
long prompts between decode steps), the same operations as ``forward``."""

import pytest
import torch

from rwkvpy.models import GPTConfig, RetNetConfig, RWKV4Config, RWKV7Config, build_model, random_state_dict
from rwkvpy.models.base import finish

from conftest import rel_err

CONFIGS = {
    "rwkv4": RWKV4Config(vocab_size=61, n_embd=40, n_layer=3, dim_ffn=72),
    "rwkv7": RWKV7Config(vocab_size=61, n_embd=128, n_layer=3),
    "retnet": RetNetConfig(vocab_size=61, n_embd=64, n_layer=3, n_head=2),
    "gpt": GPTConfig(vocab_size=61, n_layer=3, n_head=2, n_embd=32, block_size=64),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_steps_compute_forward_to_the_bit(arch):
    """The last item is forward's (logits, state), bit for bit, from a carried state; every item
    before it is None, one per layer for the recurrent families (and per internal segment of a
    long sequence); the GPT baseline, without layer steps, computes all at the first step."""
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=2))
    g = torch.Generator().manual_seed(0)
    prompt, more = (torch.randint(0, cfg.vocab_size, (2, n), generator=g) for n in (5, 11))
    with torch.no_grad():
        _, state = model(prompt)
        want_logits, want_state = model(more, state, last_only=True)
        items = list(model.forward_in_steps(more, state, last_only=True))
    assert all(item is None for item in items[:-1])
    assert len(items) - 1 == (0 if arch == "gpt" else cfg.n_layer)
    logits, got_state = items[-1]
    assert torch.equal(logits, want_logits)
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(got_state.__dict__), leaves(want_state.__dict__), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    with torch.no_grad():
        assert torch.equal(finish(model.forward_in_steps(more, state))[0], model(more, state)[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["rwkv7", "retnet"])
def test_compiled_step_writes_the_state_the_eager_step_writes(arch):
    """Decoding writes each layer's state into the next state (``out=``, no stacking); under
    torch.compile (``compile_step``) that gives the eager step's logits and states, token by
    token, from a zero state and from a prompt's."""
    cfg = CONFIGS[arch]
    model = build_model(cfg, random_state_dict(cfg, seed=3))
    tokens = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        starts = [model.zero_state(2), model(tokens[:, :3])[1]]
        eager = []
        for state in starts:
            for t in range(tokens.shape[1]):
                logits, state = model.step(tokens[:, t], state)
                eager.append((logits, state))
        model.compile_step()
        i = 0
        for state in starts:
            for t in range(tokens.shape[1]):
                logits, state = model.step(tokens[:, t], state)
                want_logits, want_state = eager[i]
                i += 1
                # fused loops round differently: within 1e-5 of each tensor's scale, as for RWKV-4's
                for a, b in zip([logits, *state.tensors().values()], [want_logits, *want_state.tensors().values()],
                                strict=True):
                    assert rel_err(a, b) < 1e-5 if a.is_floating_point() else torch.equal(a, b)

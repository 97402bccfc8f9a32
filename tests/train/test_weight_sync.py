"""The weights a generation engine is sent after each step: checkpoint names and values for a plain model, LoRA
merged without touching the policy, and FSDP2 shards gathered (2 gloo processes) equal to the unsharded model."""
import copy
import os
import subprocess
import sys
import textwrap

import torch

from fastalign.train import models
from fastalign.train.weight_sync import policy_weights


def test_plain_model_yields_its_checkpoint_weights(tiny_model_dir):
    model = models.load_model(tiny_model_dir, dtype="float32")
    sent = dict(policy_weights(model))
    state = model.state_dict()
    assert "lm_head.weight" not in sent  # tied: sent once, as the embedding
    assert set(sent) == set(state) - {"lm_head.weight"}
    for name, tensor in sent.items():
        assert tensor.data_ptr() == state[name].data_ptr()  # no copy on one process


def test_lora_is_merged_and_the_policy_left_alone(tiny_model_dir):
    policy = models.load_model(tiny_model_dir, dtype="float32", lora_r=4, lora_alpha=8,
                               lora_target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # B = 0 at init would make the merge a no-op
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    sent = dict(policy_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(sent) == set(merged) - {"lm_head.weight"}
    assert not any("lora" in n or "base_layer" in n for n in sent)
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-7, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], before[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k


def _set_adapters(model):
    """The same adapter values in every process (peft draws A at random, and B = 0 would hide the merge)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    return model


_FSDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from fastalign.train import distributed, models
    from fastalign.train.weight_sync import policy_weights
    from test_weight_sync import _set_adapters

    model_dir, out = sys.argv[1], sys.argv[2]
    info = distributed.setup("cpu")
    sent = {}
    for lora_r in (0, 2):
        model = models.load_model(model_dir, dtype="float32", lora_r=lora_r, lora_target_modules=["q_proj"])
        wrapped = distributed.wrap(_set_adapters(model), info, "fsdp")
        assert any(hasattr(p, "full_tensor") for p in wrapped.parameters())  # really sharded
        sent[lora_r] = {name: t.clone() for name, t in policy_weights(wrapped)}
    if info.rank == 0:
        torch.save(sent, out)
    distributed.cleanup()
""")


def test_fsdp2_shards_are_gathered(tmp_path, tiny_model_dir):
    script, out = tmp_path / "gather.py", tmp_path / "sent.pt"
    script.write_text(_FSDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tiny_model_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sent = torch.load(out)
    for lora_r in (0, 2):  # a plain model, and LoRA (merged, the adapters gathered too)
        model = models.load_model(tiny_model_dir, dtype="float32", lora_r=lora_r, lora_target_modules=["q_proj"])
        expected = dict(policy_weights(_set_adapters(model)))
        assert set(sent[lora_r]) == set(expected)
        for name in expected:
            torch.testing.assert_close(sent[lora_r][name], expected[name], rtol=1e-6, atol=1e-7, msg=name)

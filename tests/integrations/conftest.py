"""The embedded tiny model, saved once per session with a realistic logit scale.

Its random init gives near-uniform next-token distributions (logits of std 0.17), which hide bugs in softmax
statistics; the final norm's weight is scaled by 8 so that the logits have std about 1.4 and the entropy is about
3.3 nats of a possible 5.95, with the tied embeddings making some labels the arg-max (top-1 is not always False).
"""
import pytest
import torch

LOGIT_GAIN = 8.0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from fastalign.train.tiny import build_tiny_model_and_tokenizer

    path = build_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_GAIN)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def trl_restored():
    """Whatever a test does to the TRL switch, the next test starts with TRL's own head."""
    from fastalign.integrations import trl as integration

    yield integration
    integration.disable()

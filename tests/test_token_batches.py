"""Language models at real sizes: batches bounded by tokens, and the loss without full-vocabulary logits."""

from __future__ import annotations

import logging

import pytest
import torch

from twamerge.data import TensorData, batch_rows, epoch_steps, iter_batches
from twamerge.distributed import SingleProcess
from twamerge.evaluation import evaluate
from twamerge.models import HiddenStates, enable_gradient_checkpointing
from twamerge.tasks import CausalLM, chunked_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _ragged(n=60, seed=0, longest=40) -> TensorData:
    """``n`` rows of token ids of 2 to ``longest`` tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, longest + 1, (n,), generator=g).tolist()
    ids = [torch.randint(1, VOCAB, (k,), generator=g) for k in lengths]
    return TensorData({"input_ids": ids, "attention_mask": [torch.ones(k, dtype=torch.long) for k in lengths]},
                      ("input_ids", "attention_mask"), None, "t", {"input_ids": 0, "attention_mask": 0})


@pytest.mark.parametrize("shuffled", [False, True], ids=["scoring", "fit"])
def test_token_batches_hold_every_row_once_within_both_budgets(shuffled):
    data = _ragged()
    index = torch.arange(3, 60)  # not every row: the batches cover the index, nothing else
    gen = torch.Generator().manual_seed(1) if shuffled else None
    batches = batch_rows(data, index, 8, gen, tokens=100)
    seen = torch.cat(batches).tolist()
    assert sorted(seen) == index.tolist()
    lengths = [len(r) for r in data.columns["input_ids"]]
    for rows in batches:
        padded = len(rows) * max(lengths[i] for i in rows.tolist())
        assert len(rows) <= 8 and padded <= 100
    # Rows of similar length share a batch: far less padding than the same budget over rows in index order.
    plain = batch_rows(data, index, 8)

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b.tolist()) - sum(lengths[i] for i in b.tolist()) for b in bs)

    assert padding(batches) < 0.5 * padding(plain)
    # The batches as tensors: padded to each batch's longest row.
    for batch, rows in zip(iter_batches(data, index, 8, None, tokens=100), batch_rows(data, index, 8, None, 100)):
        assert batch.inputs["input_ids"].shape == (len(rows), max(lengths[i] for i in rows.tolist()))
    if not shuffled:  # scoring: longest rows first, so a batch too large for memory is the first one
        assert max(lengths[i] for i in batches[0].tolist()) == max(lengths[i] for i in index.tolist())
        assert epoch_steps(data, index, 8, 100) == len(batches)


def test_the_fit_epochs_differ_and_a_row_over_the_budget_is_a_batch_of_its_own():
    data = _ragged(n=30, longest=40)
    gen = torch.Generator().manual_seed(0)
    first, second = (batch_rows(data, torch.arange(30), 4, gen, tokens=60) for _ in range(2))
    assert [b.tolist() for b in first] != [b.tolist() for b in second]  # a new shuffle every epoch
    long = [i for i, r in enumerate(data.columns["input_ids"]) if len(r) > 30]
    assert long
    for rows in batch_rows(data, torch.arange(30), 4, None, tokens=30):
        if set(rows.tolist()) & set(long):
            assert len(rows) == 1


def test_rectangular_data_is_batched_by_rows_as_before_whatever_the_token_budget():
    x = torch.randn(50, 3)
    data = TensorData({"x": x, "label": torch.arange(50)}, ("x",), "label", "t")
    a = batch_rows(data, torch.arange(50), 8, torch.Generator().manual_seed(3), tokens=5)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    assert [r.tolist() for r in a] == [perm[i:i + 8].tolist() for i in range(0, 50, 8)]
    assert epoch_steps(data, torch.arange(50), 8, 5) == 7


# -- the loss from hidden states, a chunk of positions at a time -------------------------------------------

def _models() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)
    return {
        "gpt2-tied": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
        "llama-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common,
                                                                                     tie_word_embeddings=True)),
        "llama-untied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common,
                                                                                       tie_word_embeddings=False)),
        "gemma2-softcap": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, head_dim=8, final_logit_softcapping=2.0)),
        "granite-scaling": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(**common,
                                                                                               logits_scaling=4.0)),
        "cohere-scale": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.5)),
    }


def _batch(rows=3, length=12, seed=0):
    from twamerge.data import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 4:] = 0  # right padding
    mask[2, 5:] = 0
    return Batch({"input_ids": ids, "attention_mask": mask}, None)


@pytest.mark.parametrize("name", list(_models()))
def test_the_chunked_loss_equals_transformers_labels_loss_and_its_gradient(name, monkeypatch):
    torch.manual_seed(0)
    model = _models()[name]().eval()
    batch = _batch()
    labels = CausalLM.labels(batch)
    own = model(**batch.inputs, labels=labels).loss
    own.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    head = model.get_output_embeddings()
    seen: list[int] = []
    head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    monkeypatch.setattr("twamerge.tasks.chunk_positions", lambda n: 5)  # several chunks on a tiny batch
    task = CausalLM()
    out = task.forward(model, batch.inputs)
    assert isinstance(out, HiddenStates)  # the body's hidden states: no logits were made
    seen.clear()
    total, n = task.loss(out, batch)
    (total / n).backward()
    assert n == int((labels[:, 1:] != -100).sum())
    assert total.item() / n == pytest.approx(own.item(), rel=1e-6)
    assert seen and max(seen) <= 5  # the head only ever saw one chunk of positions at once ...
    assert sum(seen) == 2 * n  # ... each of them once forward, once again in the backward pass
    for key, grad in expected.items():
        got = model.get_parameter(key).grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), key


def test_chunked_cross_entropy_without_gradients_and_with_no_scored_position():
    torch.manual_seed(0)
    model = _models()["llama-tied"]()
    task = CausalLM()
    batch = _batch()
    out = task.forward(model, batch.inputs)
    with torch.no_grad():
        whole = chunked_cross_entropy(out.states[0], torch.arange(12), out.head, chunk=100)
        parts = chunked_cross_entropy(out.states[0], torch.arange(12), out.head, chunk=1)
    assert torch.allclose(whole, parts, rtol=1e-6)
    empty = chunked_cross_entropy(out.states[0, :0], torch.arange(0), out.head)
    assert empty.item() == 0 and empty.requires_grad  # a shard with nothing to score still joins the backward


class _DoubledLogits(transformers.LlamaForCausalLM):
    """A model whose forward changes its logits in a way its config does not say."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_model_whose_head_cannot_be_split_falls_back_to_its_forward_with_a_log_line(caplog):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4)
    model = _DoubledLogits(transformers.LlamaConfig(**common)).eval()
    batch = _batch()
    task = CausalLM()
    with caplog.at_level(logging.INFO, logger="twamerge.tasks"):
        out = task.forward(model, batch.inputs)
        task.forward(model, batch.inputs)
    assert not isinstance(out, HiddenStates)
    assert [r.getMessage() for r in caplog.records if "does not give the logits" in r.getMessage()] and \
        len(caplog.records) == 1  # decided once per model
    total, n = task.loss(out, batch)
    labels = CausalLM.labels(batch)[:, 1:]
    with torch.no_grad():  # the cross-entropy of the doubled logits the forward returns
        doubled = model(**batch.inputs).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(doubled.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert total.item() / n == pytest.approx(float(expected), rel=1e-6)


def test_scoring_by_tokens_gives_the_same_perplexity_as_by_rows():
    torch.manual_seed(0)
    model = _models()["gpt2-tied"]().eval()
    data = _ragged(n=40, longest=30)
    task, cpu = CausalLM(), torch.device("cpu")
    by_rows = evaluate(model, data, torch.arange(40), task, 40, cpu, SingleProcess())
    by_tokens = evaluate(model, data, torch.arange(40), task, 64, cpu, SingleProcess(), tokens=50)
    assert by_rows["n"] == by_tokens["n"] == sum(len(r) - 1 for r in data.columns["input_ids"])
    assert by_tokens["loss"] == pytest.approx(by_rows["loss"], rel=1e-5)


def test_the_token_batched_fit_gradient_equals_the_row_batched_one():
    """The fit's objective is the mean over the split's tokens: the gradients of an epoch, each weighted by its
    batch's tokens, add up to the same gradient whether rows or tokens decide the batches (and to the gradient
    of one batch of every row), through the fit's own step (combine, forward, chunked loss, project)."""
    from twamerge.fit import FlatBinding, _step
    from twamerge.subspace import StackedCandidates, build_subspace, make_layout

    torch.manual_seed(0)
    model = _models()["llama-tied"]()
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    stacks = {n: p.detach().unsqueeze(0) + 0.05 * torch.randn(3, *p.shape) for n, p in model.named_parameters()}
    layout = make_layout(names, shapes, "layer", 8)
    sub = build_subspace(StackedCandidates(stacks), layout, bits=32)
    binding = FlatBinding(model, layout, torch.device("cpu"))
    model.eval()  # no dropout: the same function of the weights in every batch
    beta = 0.3 * torch.randn(layout.n_blocks, sub.rows)
    data, task, index = _ragged(n=24, longest=20), CausalLM(), torch.arange(24)

    def epoch_gradient(batches) -> torch.Tensor:
        total, items = torch.zeros(layout.n_blocks, sub.rows, dtype=torch.float64), 0
        for batch in batches:
            n = task.count(batch)
            _, grad = _step(binding, sub, task, batch, beta, torch.device("cpu"), SingleProcess(), (1, 1))
            total += grad.double() * n
            items += n
        return total / items

    gen = torch.Generator().manual_seed(0)
    by_rows = epoch_gradient(iter_batches(data, index, 5, gen))
    by_tokens = epoch_gradient(iter_batches(data, index, 64, gen, tokens=60))
    whole = epoch_gradient(iter_batches(data, index, 24))
    assert len(batch_rows(data, index, 64, torch.Generator().manual_seed(0), tokens=60)) > 1
    assert torch.allclose(by_tokens, whole, rtol=1e-4, atol=1e-7)
    assert torch.allclose(by_rows, whole, rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_is_optional_where_the_model_cannot_do_it():
    assert enable_gradient_checkpointing(torch.nn.Linear(2, 2), "x", required=False) is False
    model = _models()["llama-tied"]()
    assert enable_gradient_checkpointing(model, "x", required=False) is True
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# -- token classification and masked LMs: the same chunked loss through the model's own head ---------------------

LABELS = 300  # a large label set, so that several chunks of 5 positions each hold real logits


def _token_models() -> dict:
    bert = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64)
    llama = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64)
    return {
        "bert": lambda: transformers.BertForTokenClassification(transformers.BertConfig(**bert, num_labels=LABELS)),
        "roberta": lambda: transformers.RobertaForTokenClassification(transformers.RobertaConfig(
            **bert, num_labels=LABELS, pad_token_id=0)),
        "distilbert": lambda: transformers.DistilBertForTokenClassification(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            num_labels=LABELS)),
        "gpt2": lambda: transformers.GPT2ForTokenClassification(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=LABELS)),
        "llama": lambda: transformers.LlamaForTokenClassification(transformers.LlamaConfig(**llama,
                                                                                           num_labels=LABELS)),
        "bert-masked-lm": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**bert)),
    }


def _token_batch(n_outputs: int, seed=0):
    """``_batch``'s inputs with labels at about half the attended positions, -100 elsewhere."""
    from twamerge.data import Batch

    inputs = _batch(seed=seed).inputs
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, n_outputs, inputs["input_ids"].shape, generator=g)
    scored = (torch.rand(labels.shape, generator=g) < 0.5) & (inputs["attention_mask"] == 1)
    return Batch(inputs, labels.masked_fill(~scored, -100))


@pytest.mark.parametrize("name", list(_token_models()))
def test_the_chunked_token_loss_equals_transformers_labels_loss_and_its_gradient(name, monkeypatch):
    from twamerge.tasks import MaskedLM, TokenClassification

    torch.manual_seed(0)
    model = _token_models()[name]().eval()
    masked = name.endswith("masked-lm")
    batch = _token_batch(VOCAB if masked else LABELS)
    own = model(**batch.inputs, labels=batch.target)
    own.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr("twamerge.tasks.chunk_positions", lambda n: 5)
    task = MaskedLM() if masked else TokenClassification()
    out = task.forward(model, batch.inputs)
    assert isinstance(out, HiddenStates)  # the body's hidden states: no logits were made
    keep = batch.target != -100
    total, n = task.loss(out, batch)
    (total / n).backward()
    assert n == int(keep.sum()) == task.count(batch)
    assert total.item() / n == pytest.approx(own.loss.item(), rel=1e-6)
    # Rounding against the largest gradient: some are zero but for it (a key bias cancels in the softmax).
    scale = max(float(g.abs().max()) for g in expected.values())
    for key, grad in expected.items():
        got = model.get_parameter(key).grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-6 * scale), key
    # The metric from the chunks: accuracy over the labelled positions (a masked LM: the loss).
    with torch.no_grad():
        loss_sum, numerator, items = task.sums(task.forward(model, batch.inputs), batch)
        correct = int((own.logits.argmax(-1)[keep] == batch.target[keep]).sum())
    assert items == n and loss_sum / n == pytest.approx(own.loss.item(), rel=1e-6)
    assert numerator == (loss_sum if masked else correct)


def test_a_token_classifier_in_training_mode_replays_its_dropout_in_the_backward(monkeypatch):
    """In the fit the head's dropout is on: each chunk's recomputation in the backward pass draws the same mask as
    its forward, so the gradient is that of the loss the forward computed (the same loss without recomputation,
    from the same random state)."""
    from twamerge.tasks import TokenClassification

    model = _token_models()["bert"]().train()
    model.config.hidden_dropout_prob = model.dropout.p = 0.5  # the head's dropout, strong enough to matter
    batch = _token_batch(LABELS)
    monkeypatch.setattr("twamerge.tasks.chunk_positions", lambda n: 5)
    task = TokenClassification()
    task.forward(model.eval(), batch.inputs)  # the split is decided (in eval mode) before the seeded passes
    model.train()
    torch.manual_seed(3)
    total, n = task.loss(task.forward(model, batch.inputs), batch)
    total.backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(3)  # the same draws in the same order: the body's, then the head's chunk by chunk
    hidden = model.bert(**batch.inputs).last_hidden_state
    keep = batch.target != -100
    h, y = hidden[keep], batch.target[keep]
    plain = sum(torch.nn.functional.cross_entropy(model.classifier(model.dropout(h[i:i + 5])), y[i:i + 5],
                                                  reduction="sum") for i in range(0, len(y), 5))
    plain.backward()
    assert total.item() == pytest.approx(plain.item(), rel=1e-6)
    with torch.no_grad():  # dropout was on: the eval-mode loss differs
        assert abs(task.loss(task.forward(model.eval(), batch.inputs), batch)[0].item() - total.item()) > 1e-3
    for key, grad in chunked.items():
        assert torch.allclose(model.get_parameter(key).grad, grad, rtol=1e-4, atol=1e-7), key


class _DoubledTokenLogits(transformers.BertForTokenClassification):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_token_classifier_whose_head_cannot_be_split_falls_back_to_its_forward_with_a_log_line(caplog):
    from twamerge.tasks import TokenClassification

    torch.manual_seed(0)
    model = _DoubledTokenLogits(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=64,
                                                        num_labels=7)).eval()
    batch = _token_batch(7)
    task = TokenClassification()
    with caplog.at_level(logging.INFO, logger="twamerge.tasks"):
        out = task.forward(model, batch.inputs)
        task.forward(model, batch.inputs)
    assert not isinstance(out, HiddenStates)
    assert len([r for r in caplog.records if "does not give the logits" in r.getMessage()]) == len(caplog.records) == 1
    total, n = task.loss(out, batch)
    with torch.no_grad():  # the cross-entropy of the doubled logits the forward returns
        doubled = model(**batch.inputs).logits
    expected = torch.nn.functional.cross_entropy(doubled.reshape(-1, 7), batch.target.reshape(-1))
    assert total.item() / n == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("name", ["gpt2-tied", "bert-token-classification"])
def test_the_entropy_loss_of_a_language_model_is_chunked_and_equals_the_full_logits_one(name, monkeypatch):
    from twamerge.tasks import CausalLM, Entropy, TokenClassification

    torch.manual_seed(0)
    if name == "gpt2-tied":
        model, base = _models()[name]().eval(), CausalLM()
    else:
        model, base = _token_models()["bert"]().eval(), TokenClassification()
    batch = _batch()
    mask = batch.inputs["attention_mask"].bool()
    logp = model(**batch.inputs).logits.float().log_softmax(-1)
    full = -(logp.exp() * logp).sum(-1)[mask].sum()
    full.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setattr("twamerge.tasks.chunk_positions", lambda n: 4)
    task = Entropy(base)
    out = task.forward(model, batch.inputs)
    assert isinstance(out, HiddenStates)
    total, n = task.loss(out, batch)
    total.backward()
    assert n == int(mask.sum()) == task.count(batch)
    assert total.item() == pytest.approx(full.item(), rel=1e-6)
    scale = max(float(g.abs().max()) for g in expected.values())
    for key, grad in expected.items():
        got = model.get_parameter(key).grad
        assert torch.allclose(got, grad, rtol=1e-4, atol=1e-6 * scale), key


def test_a_custom_loss_takes_the_full_logits_and_says_so_once(caplog):
    from twamerge.tasks import CausalLM, CustomLoss

    model = _models()["gpt2-tied"]().eval()
    task = CustomLoss(lambda output, label: output.logits.float().mean(), CausalLM())
    batch = _batch()
    with caplog.at_level(logging.INFO, logger="twamerge.tasks"):
        out = task.forward(model, batch.inputs)
        task.forward(model, batch.inputs)
    assert out.logits.shape == (*batch.inputs["input_ids"].shape, VOCAB)
    assert len([r for r in caplog.records if "full [batch, tokens, outputs] logits" in r.getMessage()]) == 1

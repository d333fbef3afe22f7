"""``kdkernels.integrations.trl`` against TRL itself: tiny Llama models built from configs (no downloads).

The same inputs go through TRL's trainer and through kdkernels' subclass; losses must agree to 1e-5 and parameter
gradients to 1e-4, at ``beta`` 0 (forward KL), 0.5 (generalized JSD) and 1 (reverse KL), with TRL's temperature
rules (GKD: the loss at T = 1 whatever ``GKDConfig.temperature``; DistillationTrainer: at ``args.temperature``) and
``num_items_in_batch``. Also: other divergences against the float64 reference on full logits, heads padded to
different sizes, a few training steps, and the peak of CPU tensor allocations against TRL's unfused GKD loss.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl", reason="trl is not installed: pip install 'kdkernels[trl]'")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from trl.experimental.gkd import GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402

from kdkernels.integrations import trl as kd_trl  # noqa: E402
from kdkernels.integrations.transformers import shifted_labels  # noqa: E402
from kdkernels.torch_ops.reference import kd_loss_reference  # noqa: E402
from tests.utils import rel_err  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = 64  # the 4 special tokens and 60 words


def tokenizer(words: int = VOCAB - len(SPECIAL)):
    """A word-level tokenizer made here (no download): ``w0 .. w{words-1}``, left padding as TRL asks."""
    vocab = {token: i for i, token in enumerate(SPECIAL + [f"w{i}" for i in range(words)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", padding_side="left")


def llama(hidden: int, seed: int, vocab: int = VOCAB) -> torch.nn.Module:
    """A 1-layer Llama; ``initializer_range=0.5`` makes the distributions far apart (losses of order 1)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.5, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def gkd_batch(vocab: int = VOCAB, rows: int = 4, length: int = 12, seed: int = 3) -> dict:
    """Left-padded prompts and completions as TRL's ``DataCollatorForChatML`` makes them: labels only on completions."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(len(SPECIAL), vocab, (rows, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    for row in range(rows):
        pad, prompt = row, 3 + row % 2
        input_ids[row, :pad] = 0
        attention_mask[row, :pad] = 0
        labels[row, :pad + prompt] = -100
    labels[0, -2] = -100  # an ignored completion token
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def collate(rows: list[dict]) -> dict:
    return {key: torch.stack([torch.tensor(row[key]) for row in rows]) for key in rows[0]}


def gkd_dataset(vocab: int = VOCAB, rows: int = 4) -> datasets.Dataset:
    batch = gkd_batch(vocab, rows)
    return datasets.Dataset.from_dict({key: value.tolist() for key, value in batch.items()})


def gkd_config(tmp_path, **overrides) -> GKDConfig:
    """TRL's configs default to ``bf16=True``, which autocasts the teacher's forward on the CPU too: float32 here."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, lmbda=0.0, seq_kd=False,
                    temperature=0.7, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, gradient_checkpointing=False, bf16=False)
    settings.update(overrides)
    return GKDConfig(**settings)


def gkd_trainers(tmp_path, beta: float, vocab: int = VOCAB, **ours_options):
    """TRL's GKDTrainer and kdkernels' over copies of the same student and the same teacher."""
    teacher = llama(24, 1, vocab)
    made = []
    for cls, options in ((TRLGKDTrainer, {}), (kd_trl.GKDTrainer, ours_options)):
        made.append(cls(model=llama(16, 0, vocab), teacher_model=teacher, args=gkd_config(tmp_path, beta=beta),
                        train_dataset=gkd_dataset(vocab), processing_class=tokenizer(), data_collator=collate,
                        **options))
    return made


def loss_and_grads(trainer, inputs, num_items_in_batch=None):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(ours, theirs):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert rel_err(loss, ref_loss) < 1e-5, (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) < 1e-4, (name, rel_err(grads[name], grad))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_equals_trl(tmp_path, beta):
    """TRL's GKD loss at T = 1 (``GKDConfig.temperature=0.7`` only samples), mean and ``num_items_in_batch``."""
    theirs, ours = gkd_trainers(tmp_path, beta)
    assert ours.loss_options["jsd_beta"] == beta and ours.loss_options["temperature"] == 1.0
    inputs = gkd_batch()
    assert_same(loss_and_grads(ours, inputs), loss_and_grads(theirs, inputs))
    assert_same(loss_and_grads(ours, inputs, torch.tensor(50)), loss_and_grads(theirs, inputs, torch.tensor(50)))
    loss, outputs = ours.compute_loss(ours.model, inputs, return_outputs=True)
    assert outputs == {} and loss.ndim == 0


def distillation_trainers(tmp_path, beta: float, temperature: float):
    """TRL's DistillationTrainer and kdkernels' (on-policy: the student samples 6 tokens after each prompt)."""
    prompts = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]})
    args = trl.DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                                  max_completion_length=6, beta=beta, temperature=temperature, report_to=[],
                                  use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                  gradient_checkpointing=False, bf16=False)
    teacher = llama(24, 1)
    return [cls(model=llama(16, 0), teacher_model=teacher, args=args, train_dataset=prompts,
                processing_class=tokenizer()) for cls in (trl.DistillationTrainer, kd_trl.DistillationTrainer)]


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_distillation_trainer_equals_trl(tmp_path, beta, temperature):
    """TRL's chunked hidden-state loss on the same generated completions (its temperature applies to the loss)."""
    theirs, ours = distillation_trainers(tmp_path, beta, temperature)
    assert ours.loss_options["temperature"] == temperature
    inputs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    inputs["completion_mask"][0, -2:] = 0  # a shorter completion
    assert_same(loss_and_grads(ours, inputs), loss_and_grads(theirs, inputs))  # with TRL's num_items_in_batch
    ours.model.eval(), theirs.model.eval()
    assert rel_err(ours.compute_loss(ours.model, inputs).detach(), theirs.compute_loss(theirs.model, inputs)) < 1e-5


def full_logits_reference(trainer, inputs, divergence, vocab=None, **options):
    """The float64 reference on both models' full shifted logits (their first ``vocab`` entries)."""
    model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    z = trainer.model(**model_inputs).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        t = trainer.teacher_model(**model_inputs).logits[:, :-1, :vocab].double()
    labels = shifted_labels(inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    return kd_loss_reference(z, t, divergence, labels=labels, **options)


@pytest.mark.parametrize("divergence,options", [
    ("akl", dict(temperature=2.0, kd_weight=0.5, ce_weight=0.5)),
    ("todi", dict(todi_beta=2.0)),
    ("jsd", dict(jsd_beta=0.3, ce_weight=0.2)),
])
def test_gkd_any_divergence(tmp_path, divergence, options):
    _, ours = gkd_trainers(tmp_path, 0.5, divergence=divergence, **options)
    inputs = gkd_batch()
    ref = full_logits_reference(ours, inputs, divergence, **options)
    ours.model.zero_grad()
    ref.backward()
    ref_grads = {name: p.grad.clone() for name, p in ours.model.named_parameters()}
    assert_same(loss_and_grads(ours, inputs), (ref.detach(), ref_grads))


def test_padded_heads_take_vocab_size(tmp_path):
    """A teacher head padded to 72 rows over the student's 64: TRL refuses it, ``vocab_size=64`` distils the rows."""
    teacher = llama(24, 1, VOCAB + 8)
    kwargs = dict(teacher_model=teacher, args=gkd_config(tmp_path, beta=0.5), train_dataset=gkd_dataset(),
                  processing_class=tokenizer(), data_collator=collate)
    with pytest.raises(ValueError, match="vocab_size"):
        TRLGKDTrainer(model=llama(16, 0), **kwargs)
    ours = kd_trl.GKDTrainer(model=llama(16, 0), vocab_size=VOCAB, **kwargs)
    assert teacher.config.vocab_size == VOCAB + 8  # restored after TRL's check
    inputs = gkd_batch()
    ref = full_logits_reference(ours, inputs, "jsd", vocab=VOCAB, jsd_beta=0.5)
    assert rel_err(ours.compute_loss(ours.model, inputs).detach(), ref.detach()) < 1e-5
    with pytest.raises(ValueError, match="exceeds the student's output layer"):
        kd_trl.GKDTrainer(model=llama(16, 0), vocab_size=VOCAB + 1, **kwargs)


def test_bad_options_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="akl_alpha"):
        gkd_trainers(tmp_path, 0.5, divergence="akl", akl_alpha=1.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        kd_trl.GKDTrainer(model=llama(16, 0), teacher_model=llama(24, 1), args=gkd_config(tmp_path),
                          processing_class=tokenizer(), data_collator=collate, temprature=2.0)


def test_training_lowers_the_loss(tmp_path):
    """End to end: ``GKDTrainer.train()`` (off-policy, the same batch every step; TRL's default gradient
    checkpointing) for 8 AdamW steps, then 2 on-policy ``DistillationTrainer`` steps (the student samples; a new
    batch each step, so only finiteness and a change of the weights are checked)."""
    ours = kd_trl.GKDTrainer(model=llama(16, 0), teacher_model=llama(24, 1),
                             args=gkd_config(tmp_path, beta=0.5, max_steps=8, learning_rate=3e-2, logging_steps=1,
                                             logging_strategy="steps", gradient_checkpointing=True),
                             train_dataset=gkd_dataset(), processing_class=tokenizer(), data_collator=collate,
                             divergence="todi", temperature=2.0, ce_weight=0.5)
    ours.train()
    losses = [entry["loss"] for entry in ours.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses

    _, on_policy = distillation_trainers(tmp_path, 1.0, 1.0)
    on_policy.args.max_steps, on_policy.args.logging_steps, on_policy.args.logging_strategy = 2, 1, "steps"
    start = on_policy.model.lm_head.weight.detach().clone()
    on_policy.train()
    logged = [entry["loss"] for entry in on_policy.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(loss == loss and loss >= 0 for loss in logged)
    assert not torch.equal(on_policy.model.lm_head.weight, start)


def peak_tensor_bytes(step) -> int:
    """Peak of CPU tensor memory allocated during ``step()`` above what was allocated before it.

    torch's profiler (``profile_memory=True``) records every allocation and free of the CPU allocator, each with
    the running total of bytes allocated since profiling began; the peak is the largest such total. (It counts
    tensor storage only: not Python objects, nor the allocator's unused heap.)
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kdkernels-trace-{os.getpid()}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def test_peak_memory_below_trl_unfused(tmp_path, monkeypatch):
    """V = 2048, 8 x 256 tokens: TRL's GKD loss makes full (N, V) logits of both models, their log-softmaxes and the
    mixture's terms (16 MiB each); the fused loss the same for one chunk of 256 tokens at a time. The torch backend's
    chunk functions run eagerly here (``KDKERNELS_COMPILE=0``): compiling them would take longer than the test."""
    monkeypatch.setenv("KDKERNELS_COMPILE", "0")
    vocab = 2048
    theirs, ours = gkd_trainers(tmp_path, 0.5, vocab=vocab)
    inputs = gkd_batch(vocab, rows=8, length=256)
    peaks = {}
    for name, trainer in (("trl", theirs), ("kdkernels", ours)):
        trainer.model.zero_grad(set_to_none=True)
        peaks[name] = peak_tensor_bytes(lambda t=trainer: t.compute_loss(t.model, inputs).backward())
    logits_bytes = 8 * 255 * vocab * 4
    assert peaks["trl"] > 6 * logits_bytes, peaks
    assert peaks["kdkernels"] < peaks["trl"] / 3, peaks

"""Benchmark: the course's DPO and GRPO (chapter 13, `speechllm_course.preference`) vs TRL's `DPOTrainer` / `GRPOTrainer`.

What is compared
----------------
One optimisation step of each method on the same tiny Llama (`LlamaForCausalLM(tiny_llama_config(...))` at the sizes of
the course's tiny LLM, `lm.LM_SIZES`: smoke 64-d x 2 layers, vocab 400; course/full 192-d x 4 layers, vocab 1000;
random init, seed 0, with a BPE tokenizer trained on SpeechWorld text) and the same data: SpeechWorld text QA questions
(`lm.text_documents`, kind 'question'). Every model on both sides is a copy of one initialisation (policy and frozen
reference alike), so ours and TRL's start from identical weights. CPU, fp32, one torch thread (`BENCH_THREADS`),
AdamW (torch, foreach; lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay) built the same way on both sides, no
gradient accumulation, no gradient clipping, no lr schedule, no gradient checkpointing (TRL turns it on by default:
switched off here, as ours has none), no dropout (the tiny Llama has none).

* DPO, B pairs (chosen = the question's own answer, rejected = another question's answer), beta 0.1.
  ours: `dpo_forward(policy, reference, dpo_batch(tokenizer, pairs), beta)` + backward + `opt.step()` + `opt.zero_grad()`
  (the batch is collated once, outside the timing, as a DataLoader would).
  TRL: `DPOTrainer(model, ref_model=<explicit frozen copy>, ...)`; the batch is the first batch of its own train
  dataloader (its tokenisation and collator, the same B pairs); a step is `trainer.training_step(model, batch)` +
  `opt.step()` + `opt.zero_grad()`. We drive `training_step` rather than `train()`: `train()`'s loop adds gradient
  clipping, an lr scheduler, dataloader fetches and logging that our step does not have; `training_step` is exactly
  TRL's forward (policy + reference, fused LM head, metrics) + loss + backward.
* GRPO, Q prompts x G samples, max_completion_length L, temperature 1.0, top_k 0 / top_p 1.0, beta 0.04, epsilon 0.2,
  loss_type 'grpo' (per-sequence token mean, then mean), group-std advantage scaling, num_iterations 1 (on-policy:
  no old-log-prob pass), TRL's `use_bias_correction_kl=False` (DeepSeekMath's KL, what ours computes), no vLLM.
  Reward on both sides: `length_parity` below, a deterministic rule on the decoded reply (its word count is odd) that
  gives mixed groups with a random model (the course's `answer_reward` would give all-zero groups: no gradient).
  ours: one `GRPOObjective(tokenizer, reference=<frozen copy>, ...)(policy, batch)` call (G samples per prompt with
  `model.generate`, decode, rewards, advantages, policy log-probs with grad, reference log-probs, loss) + backward +
  `opt.step()` + `opt.zero_grad()`.
  TRL: `GRPOTrainer` (its reference: built by TRL itself from the saved initial weights, = the same frozen copy); the
  raw generation batch is the first batch of its own train dataloader (the Q prompts, each repeated G times); a step is
  `trainer.training_step(model, batch)` (its `_prepare_inputs` -> `_generate_and_score_completions`: generation,
  rewards, advantages, reference log-probs; then `_compute_loss` with policy log-probs and entropies; backward) +
  `opt.step()` + `opt.zero_grad()`.

Timing: ours and TRL's steps alternate (ours, TRL, ours, TRL, ...) so that load from other processes hits both alike;
the first `WARMUP` steps of each are dropped; reported: the median wall time of the `STEPS` timed steps (and the
median CPU time of this process, less sensitive to other work on the machine). ratio = TRL time / our time (> 1: ours
is faster). speedup_vs_trl = the geometric mean of the DPO and GRPO wall-time ratios.

Correctness on the same tensors:
* dpo_loss_maxdiff: max |our `dpo_loss` - TRL's `DPOTrainer._compute_loss`| over 4 random batches of sequence
  log-probs (TRL's model replaced by a stand-in that returns them), and the end-to-end loss on the tiny Llama
  (our `dpo_forward` vs TRL's `_compute_loss` with its fused LM head) on our batch, after training.
* grpo_loss_maxdiff: max |our `grpo_loss` - TRL's `GRPOTrainer._compute_loss`| over 4 random batches of per-token
  log-probs (off-policy, so the clip is exercised; beta 0.04, loss 'grpo'), and end to end on the tiny Llama: a
  generation batch TRL prepared (its prompts, completions, reference log-probs, advantages), scored by our
  `token_logprobs` + `grpo_loss` vs TRL's `_compute_loss`.
The last line is `RESULT speedup_vs_trl=<geo-mean ratio> dpo_loss_maxdiff=<x> grpo_loss_maxdiff=<x>`.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch

THREADS = int(os.environ.get("BENCH_THREADS", 1))  # tiny models: one thread each, immune to OpenMP spin-waits on a shared machine
torch.set_num_threads(THREADS)

SIZES = {  # model from lm.LM_SIZES; DPO pairs; GRPO prompts x G, max completion tokens (chapter 13's PREFERENCE_SIZES)
    "smoke": dict(tok_docs=1000, dpo_pairs=4, grpo_prompts=2, G=4, max_new=12, warmup=3, steps=25),
    "course": dict(tok_docs=3000, dpo_pairs=8, grpo_prompts=8, G=8, max_new=16, warmup=3, steps=20),
}
SIZES["full"] = SIZES["course"]
LR, DPO_BETA, GRPO_BETA, EPSILON, TEMPERATURE = 1e-5, 0.1, 0.04, 0.2, 1.0


def length_parity(reply: str) -> float:
    "The shared GRPO reward: 1.0 when the (whitespace-normalised) reply has an odd number of words."
    return float(len(reply.split()) % 2)


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    "`length_parity` with TRL's reward signature (conversational completions: [{'role': 'assistant', 'content': ...}])."
    return [length_parity(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    for name in ("trl", "accelerate", "datasets"): logging.getLogger(name).setLevel(logging.ERROR)


def build(scale: str):
    "Tokenizer, the initial tiny Llama, and the QA questions."
    from transformers import LlamaForCausalLM
    from speechllm_course.lm import LM_SIZES, render, text_documents, tiny_llama_config, train_text_tokenizer
    s, lm = SIZES[scale], LM_SIZES["smoke" if scale == "smoke" else "course"]
    tokenizer = train_text_tokenizer([render(d) for d in text_documents(s["tok_docs"], seed=0)], lm.vocab_size)
    torch.manual_seed(0)
    init = LlamaForCausalLM(tiny_llama_config(tokenizer, lm.hidden, lm.layers, lm.heads, lm.kv_heads, max_len=512)).float()
    questions = [(d["messages"][0]["content"], d["messages"][1]["content"], d["answer"])
                 for d in text_documents(64, seed=1, mix=dict(question=1.0))]
    return tokenizer, init, questions, lm


def frozen(model):
    m = copy.deepcopy(model).eval()
    m.requires_grad_(False)
    return m


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def trl_args(config_cls, out_dir, **kw):
    return config_cls(output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
                      logging_strategy="no", gradient_checkpointing=False, learning_rate=LR, optim="adamw_torch",
                      weight_decay=0.0, max_grad_norm=0.0, gradient_accumulation_steps=1, seed=0, disable_dropout=True,
                      dataloader_num_workers=0, **kw)


def timed(step):
    w, c = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - w, time.process_time() - c


def busy_cpu_seconds() -> float:
    "CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; 0 elsewhere)."
    try:
        with open("/proc/stat") as f: v = [int(x) for x in f.readline().split()[1:9]]
    except OSError: return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def race(ours, theirs, warmup: int, steps: int) -> dict:
    "Alternate our step and TRL's; medians (ms) of the timed ones, and the CPU the rest of the machine used meanwhile."
    t = {"ours": [], "trl": []}
    for i in range(warmup + steps):
        if i == warmup: busy0, cpu0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        for name, fn in (("ours", ours), ("trl", theirs)):
            r = timed(fn)
            if i >= warmup: t[name].append(r)
    # others: cores' worth of CPU used by other processes while we ran (0 = an idle machine; >= 1 = a core taken)
    others = max(0.0, busy_cpu_seconds() - busy0 - (time.process_time() - cpu0)) / (time.perf_counter() - wall0)
    med = lambda xs, k: 1000 * statistics.median(x[k] for x in xs)
    return dict(ours_ms=med(t["ours"], 0), trl_ms=med(t["trl"], 0), ours_cpu_ms=med(t["ours"], 1), trl_cpu_ms=med(t["trl"], 1),
                others=others)


# ---------------------------------------------------------------------------------------------------------- DPO
def dpo_pairs_of(questions, n):
    pairs = []
    for i in range(len(questions)):
        q, a, _ = questions[i]
        other = next(questions[j % len(questions)][1] for j in range(i + 1, i + len(questions)) if questions[j % len(questions)][1].strip() != a.strip())
        pairs.append(dict(prompt=q, chosen=a, rejected=other))
        if len(pairs) == n: return pairs
    raise ValueError("not enough questions")


def trl_dpo_loss(trainer, pc, pr, rc, rr, beta):
    "TRL's DPO loss for given sequence log-probs (as tests/test_preference.py: a stand-in model returns them)."
    n = pc.shape[0]
    zeros = torch.zeros(2 * n, 1)
    logps = torch.cat([pc, pr])[:, None]

    def logps_model(**kwargs):
        logits = torch.stack([logps, torch.log1p(-torch.exp(logps))], dim=-1)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), log_sum_sq_probs=zeros,
                               logits=torch.cat([logits, torch.zeros_like(logits)], dim=1), aux_loss=None)
    trainer.beta, trainer.precompute_ref_logps = beta, True
    trainer._metrics = {m: defaultdict(list) for m in ("train", "eval")}
    trainer.model.eval()
    inputs = dict(input_ids=torch.zeros(2 * n, 2, dtype=torch.long), attention_mask=torch.ones(2 * n, 2, dtype=torch.long),
                  completion_mask=torch.ones(2 * n, 2, dtype=torch.long), ref_chosen_logps=rc, ref_rejected_logps=rr)
    return trainer._compute_loss(logps_model, inputs, return_outputs=False)


def bench_dpo(tokenizer, init, questions, s, tmp) -> dict:
    import trl
    from datasets import Dataset
    from speechllm_course.preference import dpo_batch, dpo_forward, dpo_loss
    pairs = dpo_pairs_of(questions, s["dpo_pairs"])
    # ours
    policy, reference = copy.deepcopy(init).train(), frozen(init)
    opt = adamw(policy)
    batch = dpo_batch(tokenizer, pairs)

    def ours():
        out = dpo_forward(policy, reference, batch, DPO_BETA)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    # TRL
    data = Dataset.from_list([dict(prompt=[dict(role="user", content=p["prompt"])], chosen=[dict(role="assistant", content=p["chosen"])],
                                   rejected=[dict(role="assistant", content=p["rejected"])]) for p in pairs])
    trl_policy = copy.deepcopy(init)
    trl_opt = adamw(trl_policy)
    trainer = trl.DPOTrainer(model=trl_policy, ref_model=frozen(init), train_dataset=data, processing_class=tokenizer,
                             args=trl_args(trl.DPOConfig, f"{tmp}/dpo", beta=DPO_BETA, per_device_train_batch_size=len(pairs),
                                           max_length=512, loss_type=["sigmoid"], precompute_ref_log_probs=False),
                             optimizers=(trl_opt, None))
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop; we drive training_step directly
    assert not getattr(trainer.model, "is_gradient_checkpointing", False)
    trl_batch = next(iter(trainer.get_train_dataloader()))

    def theirs():
        trainer.training_step(trainer.model, trl_batch)
        trl_opt.step()
        trl_opt.zero_grad()
    t = race(ours, theirs, s["warmup"], s["steps"])
    t.update(ours_shape=tuple(batch["input_ids"].shape), trl_shape=tuple(trl_batch["input_ids"].shape),
             ours_tokens=int(batch["attention_mask"].sum()), trl_tokens=int(trl_batch["attention_mask"].sum()))
    # after the same number of identical steps the two policies should still agree
    t["weights_maxdiff"] = max(float((a - b).abs().max()) for a, b in zip(policy.parameters(), trainer.model.parameters()))

    # correctness: random sequence log-probs, then end to end on the trained tiny Llama
    diffs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        pc, pr, rc, rr = (-5 * torch.rand(16, generator=g) - 0.1 for _ in range(4))
        diffs.append(abs(float(dpo_loss(pc, pr, rc, rr, beta=DPO_BETA)["loss"]) - float(trl_dpo_loss(trainer, pc, pr, rc, rr, DPO_BETA))))
    trainer.beta, trainer.precompute_ref_logps = DPO_BETA, False
    trainer.model.eval()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], completion_mask=(batch["labels"] != -100).long())
    with torch.no_grad():
        theirs_loss = float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))
        ours_out = dpo_forward(trainer.model, trainer.ref_model, batch, beta=DPO_BETA)
    diffs.append(abs(float(ours_out["loss"]) - theirs_loss))
    t.update(loss_maxdiff=max(diffs), e2e_diff=diffs[-1], e2e_margin=float(ours_out["margin"]))
    return t


# ---------------------------------------------------------------------------------------------------------- GRPO
def trl_grpo_loss(trainer, logp, old, ref, adv, mask):
    "TRL's GRPO loss for given per-token log-probs (as tests/test_preference.py: the model's log-probs replaced)."
    B, T = logp.shape
    outs = (logp, torch.zeros_like(logp), None)
    n_out = 3 if "aux_loss" in inspect.getsource(type(trainer)._get_per_token_logps_and_entropies) else 2
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: outs[:n_out]
    trainer.max_completion_length = T
    trainer._metrics = {m: defaultdict(list) for m in ("train", "eval")}
    trainer.model.eval()
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=adv,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    try: return trainer._compute_loss(trainer.model, inputs)
    finally: del trainer._get_per_token_logps_and_entropies


def bench_grpo(tokenizer, init, questions, s, tmp) -> dict:
    import trl
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from speechllm_course.preference import GRPOObjective, grpo_collate, grpo_loss, group_advantages, token_logprobs
    Q, G, L = s["grpo_prompts"], s["G"], s["max_new"]
    qs = questions[:Q]
    # ours
    policy = copy.deepcopy(init).train()
    opt = adamw(policy)
    objective = GRPOObjective(tokenizer, reward_fn=lambda reply, answer: length_parity(reply), group_size=G, beta=GRPO_BETA,
                              epsilon=EPSILON, loss_type="grpo", advantage_scale="group", temperature=TEMPERATURE, max_new_tokens=L,
                              top_k=0, reference=frozen(init), seed=0)
    batch = grpo_collate([dict(prompt=q, answer=a, _index=i) for i, (q, _, a) in enumerate(qs)])
    logs = defaultdict(list)

    def ours():
        objective.seed += 1  # a new sampling seed every step, as a new batch would get (fixed, it would replay one draw)
        out = objective(policy, batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        for k in ("reply_tokens", "mixed_groups"): logs[k].append(float(out[k]))
    # TRL: the policy loaded from the saved initial weights, so that TRL builds its reference from the same folder
    init.save_pretrained(f"{tmp}/init")
    trl_policy = LlamaForCausalLM.from_pretrained(f"{tmp}/init", dtype=torch.float32)
    trl_opt = adamw(trl_policy)
    args = trl_args(trl.GRPOConfig, f"{tmp}/grpo", num_generations=G, num_generations_eval=G, per_device_train_batch_size=Q * G,
                    per_device_eval_batch_size=Q * G, max_completion_length=L, beta=GRPO_BETA, epsilon=EPSILON, loss_type="grpo",
                    scale_rewards="group", use_bias_correction_kl=False, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                    num_iterations=1, steps_per_generation=1, use_vllm=False, mask_truncated_completions=False, log_completions=False)
    data = Dataset.from_list([dict(prompt=[dict(role="user", content=q)], answer=a) for q, _, a in qs])
    trainer = trl.GRPOTrainer(model=trl_policy, reward_funcs=[trl_reward], args=args, train_dataset=data, processing_class=tokenizer,
                              optimizers=(trl_opt, None))
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop; we drive training_step directly
    assert trainer.ref_model is not None and not trainer.use_vllm and trainer.num_iterations == 1
    assert max(float((a - b).abs().max()) for a, b in zip(trainer.ref_model.parameters(), init.parameters())) == 0
    raw = next(iter(trainer.get_train_dataloader()))  # Q prompts, each G times
    assert len(raw) == Q * G and sorted({r["prompt"][0]["content"] for r in raw}) == sorted(q for q, _, _ in qs)

    def theirs():
        trainer.training_step(trainer.model, raw, None)
        trl_opt.step()
        trl_opt.zero_grad()
        logs["trl_reply_tokens"].append(trainer._metrics["train"]["completions/mean_length"][-1])
    t = race(ours, theirs, s["warmup"], s["steps"])
    t.update(ours_reply_tokens=statistics.mean(logs["reply_tokens"]), trl_reply_tokens=statistics.mean(logs["trl_reply_tokens"]),
             mixed_groups=statistics.mean(logs["mixed_groups"]))

    # correctness 1: random per-token log-probs (off-policy: ratios clip), TRL's _compute_loss with its log-probs replaced
    diffs = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        B, T = 8, 7
        logp = -5 * torch.rand(B, T, generator=g) - 0.1
        old = logp + 0.3 * torch.randn(B, T, generator=g)
        ref = -5 * torch.rand(B, T, generator=g) - 0.1
        adv = group_advantages(torch.randint(0, 2, (2, 4), generator=g).float()).flatten()
        mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).long()
        ours_loss = grpo_loss(logp, old, ref, adv, mask, beta=GRPO_BETA, epsilon=EPSILON, loss_type="grpo")["loss"]
        diffs.append(abs(float(ours_loss) - float(trl_grpo_loss(trainer, logp, old, ref, adv, mask))))
    # correctness 2: end to end on the trained tiny Llama, on a batch TRL generated and scored itself
    trainer.max_completion_length = L
    trainer.model.train()
    with torch.no_grad():
        inputs = trainer._generate_and_score_completions(copy.deepcopy(raw))
        trainer.model.eval()
        theirs_loss = float(trainer._compute_loss(trainer.model, inputs))
        rows = [torch.cat([p[pm.bool()], c[cm.bool()]]) for p, pm, c, cm in
                zip(inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"])]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
        am, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for b, (r, pm) in enumerate(zip(rows, inputs["prompt_mask"])):
            n, p = len(r), int(pm.sum())
            ids[b, :n], am[b, :n], labels[b, p:n] = r, 1, r[p:]
        logp = token_logprobs(trainer.model, ids, am, labels, TEMPERATURE)
        ref = token_logprobs(trainer.ref_model, ids, am, labels, TEMPERATURE)
        ours_loss = grpo_loss(logp, None, ref, inputs["advantages"], (labels != -100).long(), beta=GRPO_BETA, epsilon=EPSILON, loss_type="grpo")
    diffs.append(abs(float(ours_loss["loss"]) - theirs_loss))
    t.update(loss_maxdiff=max(diffs), e2e_diff=diffs[-1], e2e_kl=float(ours_loss["kl"]))
    return t


def main() -> None:
    from speechllm_course.core import get_scale
    scale = get_scale()
    print(f"preference benchmark (DPO, GRPO): ours (speechllm_course.preference) vs TRL, scale={scale}, "
          f"torch threads={THREADS} (torch.set_num_threads), CPU, fp32")
    try:
        import trl
    except ImportError:
        print("TRL is not installed (it is a dev/test dependency: pip install -e '.[dev]'): nothing to compare against.")
        print("RESULT speedup_vs_trl=nan dpo_loss_maxdiff=nan grpo_loss_maxdiff=nan")
        return
    import transformers
    quiet()
    s = SIZES[scale]
    t0 = time.perf_counter()
    tokenizer, init, questions, lm = build(scale)
    print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"model: tiny Llama {lm.hidden}-d x {lm.layers} layers ({lm.heads} heads, {lm.kv_heads} kv), vocab {len(tokenizer)}, "
          f"{sum(p.numel() for p in init.parameters()) / 1e6:.2f} M parameters, random init (seed 0); AdamW lr {LR}; "
          f"{s['warmup']} warm-up + {s['steps']} timed steps each, alternating ours/TRL  ({time.perf_counter() - t0:.1f} s setup)")
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        dpo = bench_dpo(tokenizer, init, questions, s, tmp)
        print(f"DPO: {s['dpo_pairs']} pairs, beta {DPO_BETA}; batch (2B x T) ours {dpo['ours_shape']} / {dpo['ours_tokens']} tokens, "
              f"TRL {dpo['trl_shape']} / {dpo['trl_tokens']} tokens; policies after the timed steps differ by "
              f"{dpo['weights_maxdiff']:.1e} (max |weight|)  ({time.perf_counter() - t1:.1f} s)", flush=True)
        t1 = time.perf_counter()
        grpo = bench_grpo(tokenizer, init, questions, s, tmp)
        print(f"GRPO: {s['grpo_prompts']} prompts x G={s['G']}, max_completion_length {s['max_new']}, beta {GRPO_BETA}, loss 'grpo'; "
              f"mean reply tokens ours {grpo['ours_reply_tokens']:.1f}, TRL {grpo['trl_reply_tokens']:.1f}; "
              f"mixed groups (ours) {grpo['mixed_groups']:.2f}  ({time.perf_counter() - t1:.1f} s)", flush=True)
    ratios = {name: r["trl_ms"] / r["ours_ms"] for name, r in (("DPO", dpo), ("GRPO", grpo))}
    speedup = math.sqrt(ratios["DPO"] * ratios["GRPO"])
    print(f"\n| method | ours ms/step | TRL ms/step | ratio TRL/ours (wall) | ours cpu ms | TRL cpu ms | ratio (cpu) | others' cpu (cores) "
          f"| loss maxdiff (e2e) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("DPO", dpo), ("GRPO", grpo)):
        print(f"| {name} | {r['ours_ms']:.1f} | {r['trl_ms']:.1f} | {ratios[name]:.2f} | {r['ours_cpu_ms']:.1f} | {r['trl_cpu_ms']:.1f} | "
              f"{r['trl_cpu_ms'] / r['ours_cpu_ms']:.2f} | {r['others']:.2f} | {r['loss_maxdiff']:.1e} ({r['e2e_diff']:.1e}) |")
    if max(dpo["others"], grpo["others"]) > 0.5:
        print(f"note: other processes kept ~{max(dpo['others'], grpo['others']):.1f} core(s) busy during the timing: wall times are "
              f"inflated and noisy; the cpu-time ratios are the steadier comparison")
    print(f"speedup_vs_trl = geometric mean of the DPO and GRPO wall ratios = {speedup:.2f} (> 1: ours faster); "
          f"end-to-end checks: DPO margin {dpo['e2e_margin']:.2e}, GRPO KL {grpo['e2e_kl']:.2e} (non-zero: policy != reference); "
          f"total {time.perf_counter() - t0:.0f} s")
    print(f"RESULT speedup_vs_trl={speedup:.3f} dpo_loss_maxdiff={dpo['loss_maxdiff']:.2e} grpo_loss_maxdiff={grpo['loss_maxdiff']:.2e}")


if __name__ == "__main__":
    main()

"""The study config: one YAML file, one pydantic model, every default declared here.

Section names are the stage names used everywhere else (store folders, table
prefixes, Prefect task names): `data`, `sft`, `eval`, ...
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """Bad user input: the message names the file and the field; the CLI exits with status 2."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default);
    # frozen so a validated config cannot drift while a study runs.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _increasing(values: list[int]) -> list[int]:
    """Reject negative or non-increasing step lists, naming the offending index."""
    for i, v in enumerate(values):
        if v < 0:
            raise ValueError(f"[{i}]: must be >= 0, got {v}")
        if i and v <= values[i - 1]:
            raise ValueError(f"[{i}]: must be greater than {values[i - 1]}")
    return values


class TinyModel(Section):
    """The embedded Llama-architecture default (training.md §1)."""

    hidden_size: int = Field(64, ge=8, description="width; divisible by num_attention_heads")
    num_hidden_layers: int = Field(2, ge=1, description="decoder layers")
    num_attention_heads: int = Field(4, ge=1, description="query heads")
    num_key_value_heads: int = Field(2, ge=1, description="< heads gives non-square k/v (GQA)")
    intermediate_size: int = Field(172, ge=8, description="MLP width (gate / up / down projections)")
    max_position_embeddings: int = Field(1024, ge=64, description="longest sequence in tokens; an SFT row longer than this is an error")
    tie_word_embeddings: bool = Field(True, description="lm_head shares the input embedding's weights (false: separate, as both paper models)")
    seed: int = Field(0, description="initialisation seed; the model is built deterministically")

    @model_validator(mode="after")
    def _heads(self) -> TinyModel:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size: must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_key_value_heads: must divide num_attention_heads")
        return self


class ModelSection(Section):
    """Where the starting model comes from: exactly one of `builtin` and `name_or_path`."""

    builtin: Literal["tiny"] | None = Field(None, description="the embedded model, built locally (model.tiny); null = name_or_path")
    name_or_path: str | None = Field(None, description="HF directory or hub id (read from the local cache only)")
    trust_remote_code: bool = Field(False, description="let transformers run the model directory's own code (needed by some hub models)")
    tiny: TinyModel = TinyModel()

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.builtin is None) == (self.name_or_path is None):
            raise ValueError("set exactly one of model.builtin and model.name_or_path")
        return self


class PretrainSection(Section):
    """Stage `pretrain` (builtin models only): give the tiny model general knowledge to lose,
    from the task's synthetic corpus, which never states either split's rule in the
    benchmark's words (GeneralPoints: the face-card values; V-IRL: the action space)."""

    enabled: bool = Field(False, description="pretrain the builtin model before SFT")
    steps: int = Field(3000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per step")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW peak learning rate: linear warm-up, then a cosine to a tenth of it at the last step")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    seed: int = Field(0, ge=0, description="corpus and training seed")
    corpus_size: int = Field(100_000, ge=1, description="synthetic examples (each used at most once per pass)")
    benchmark_format_fraction: float = Field(1 / 3, ge=0, le=1, description="share of corpus prompts answered in the benchmark's answer block")
    use_shipped: bool = Field(True, description="start from the checkpoint shipped with rlheal when its config matches")


class ChatSection(Section):
    """How conversations become text: the model's chat template, rendered by one function (GP §4)."""

    date_string: str | None = Field(
        "26 Jul 2024", description="fixed date for templates that insert one (GP §4); null = today"
    )


class VerifierSection(Section):
    """How an answer is graded (GP §7, §8)."""

    mode: Literal["exact", "reference"] = Field("exact", description="arithmetic of the verifier (GP §7.3)")
    verify_iter: int = Field(5, ge=1, le=20, description="graded attempts per episode (GP §8)")


class VirlSection(Section):
    """The V-IRL navigation task (`task: virl`, tasks/virl/)."""

    routes: str | None = Field(None, description="the authors' route_infos.json to deal routes from; none: procedurally generated routes")


class DataSection(Section):
    """The data stage: SFT rows and the fixed evaluation hands (GP §2, §5)."""

    train_seed: int = Field(0, ge=0, description="seed of the SFT training-hand stream")
    train_size: int = Field(10_240, ge=1, description="rows of sft_train")
    eval_seed: int = Field(42, ge=0, description="seed of the evaluation hands")
    eval_size: int = Field(234, ge=1, description="evaluation hands per split")
    overlap: Literal["ordered", "multiset"] = Field("ordered", description="a training hand equal to an evaluation hand is skipped: same cards in order (ordered) or in any order (multiset)")
    answer: Literal["reference", "first"] = Field(
        "reference",
        description="SFT target formula: the dealt reference (GP §2.4) or the first canonical solution",
    )
    multi_turn_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of multi-turn SFT rows (GP §5)")

    @model_validator(mode="after")
    def _disjoint_streams(self) -> DataSection:
        if self.train_seed == self.eval_seed:
            raise ValueError(f"train_seed: must differ from eval_seed ({self.eval_seed}) so the hand streams are disjoint")
        return self


class LoraSection(Section):
    """Low-rank adapters (peft) instead of full fine-tuning, for SFT and GRPO alike. Every saved
    checkpoint holds full weights, the adapters merged in fp32 (the analysis needs full matrices)."""

    enabled: bool = Field(False, description="train LoRA adapters instead of every weight")
    r: int = Field(64, ge=1, description="adapter rank")
    alpha: int = Field(16, ge=1, description="adapter scale: the weight update is (alpha / r) B A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1,
        description="module-name suffixes that get adapters; a list that matches no module of the model is an error",
    )


class SftSection(Section):
    """Supervised fine-tuning (training.md §2)."""

    save_steps: list[int] = Field([0, 10, 20, 40, 80], min_length=1, description="checkpoint steps; 0 = the base")
    save_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="dtype of saved SFT checkpoints (training keeps fp32 weights, bf16 autocast on GPU); auto = the starting "
        "model's stored dtype. bfloat16 halves the disk but rounds each weight to 2^-8 relative: at lr 1e-6 the change "
        "between nearby checkpoints falls below that, so the svd stage would read it as zero (analysis.md §2)",
    )
    learning_rate: float = Field(1e-6, gt=0, description="AdamW's peak learning rate")
    lr_schedule: Literal["log_warmup_constant", "cosine", "constant", "linear_warmup_constant"] = Field(
        "log_warmup_constant", description="step s uses lr x min(1, ln(s + 1) / ln warmup_steps) (the authors'), or a cosine, constant or linear warm-up (§2.2)",
    )
    warmup_steps: int = Field(376, ge=0, description="W of the warm-up schedules")
    batch_size: int = Field(64, ge=1, description="global batch = per_device_batch_size x accumulation x devices")
    per_device_batch_size: int = Field(16, ge=1, description="rows per forward/backward pass on one device; accumulation = batch_size / (this x devices)")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2")
    adam_epsilon: float = Field(1e-7, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, more compute")
    log_every: int = Field(1, ge=1, description="sft_log row (loss, lr, gradient norm) every this many steps")
    ce_every: int = Field(10, ge=1, description="reference-answer CE of both splits (training.md §7.3) every this many steps")
    lora: LoraSection = LoraSection()

    @field_validator("save_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        return _increasing(v)

    @model_validator(mode="after")
    def _batch(self) -> SftSection:
        if self.batch_size % self.per_device_batch_size:
            raise ValueError("batch_size: must be a multiple of per_device_batch_size")
        return self

    @property
    def max_steps(self) -> int:
        return self.save_steps[-1]


DECODING_PRESETS: dict[str, dict[str, Any]] = {
    # training.md §6; top_k 0 = off. Sampling presets reproduce the authors' effective settings.
    "greedy": {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 256},
    "authors_eval_llama": {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 256},
    "authors_eval_qwen": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 256},
    "authors_rl_llama": {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 512},
    "authors_rl_qwen": {"do_sample": True, "temperature": 0.2, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512},
    "rl_default": {"do_sample": True, "temperature": 0.2, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 512},
    # training.md §4: GRPO's group of completions per prompt, sampled at temperature 1
    "grpo_default": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 256},
}


class DecodingSection(Section):
    """Generation settings, always explicit (training.md §6): a preset, then any field set here
    overrides it. A checkpoint's generation_config.json is never consulted. Each stage has its
    own default preset (evaluation `greedy`, PPO rollouts `rl_default`, GRPO `grpo_default`); a
    section that sets only some fields keeps its stage's preset, and only an explicit `preset:`
    changes it."""

    preset: Literal[tuple(DECODING_PRESETS)] = Field("greedy", description="the stage's default unless set: eval greedy, rl rl_default, rl.grpo grpo_default")  # type: ignore[valid-type]
    do_sample: bool | None = Field(None, description="sample (true) or take the argmax token (false); null = the preset's")
    temperature: float | None = Field(None, gt=0, description="logits are divided by it before sampling; null = the preset's")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this much probability; 1 = off")
    top_k: int | None = Field(None, ge=0, description="sample among the k most likely tokens; 0 = off")
    repetition_penalty: float | None = Field(None, gt=0, description="transformers' repetition penalty; 1 = off")
    max_new_tokens: int | None = Field(None, ge=1, description="generation limit per response; a response that reaches it is truncated")
    seed: int = Field(42, description="torch generator seed per evaluation call, or of the RL run (sampling only)")

    def resolved(self) -> dict[str, Any]:
        values = dict(DECODING_PRESETS[self.preset])
        values.update({k: v for k, v in self.model_dump(exclude={"preset", "seed"}).items() if v is not None})
        return {**values, "seed": self.seed, "preset": self.preset}


class RlDecodingSection(DecodingSection):
    """RL rollouts sample (training.md §3.2, §6): `{max_new_tokens: 64}` alone is `rl_default`
    with 64 new tokens, not greedy."""

    preset: Literal[tuple(DECODING_PRESETS)] = Field("rl_default", description="rl_default unless set; PPO needs samples (rl.allow_greedy_rollouts)")  # type: ignore[valid-type]


class GrpoDecodingSection(DecodingSection):
    """GRPO's completions (training.md §4): `grpo_default` (temperature 1, 256 new tokens) unless
    set. GRPO always samples: its advantages compare the completions of one prompt."""

    preset: Literal[tuple(DECODING_PRESETS)] = Field("grpo_default", description="grpo_default unless set; must sample")  # type: ignore[valid-type]


class EvalSection(Section):
    """Evaluation of every checkpoint on both splits (training.md §7)."""

    batch_size: int = Field(64, ge=1, description="episodes generated together; halved automatically on out-of-memory")
    ce_hands: int = Field(100, ge=0, description="hands per split for the reference-answer cross-entropy (§7.3)")
    decoding: DecodingSection = DecodingSection()


KSpec = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)]


class PpoSection(Section):
    """The authors' PPO, our implementation (training.md §3); defaults are theirs."""

    num_envs: int = Field(64, ge=1, description="E: environments (episodes) advanced together, one batched generate call per round (§3.2)")
    steps_per_env: int = Field(8, ge=1, description="T: rollout rounds per update; an update trains on E*T samples (§3.2)")
    epochs: int = Field(4, ge=1, description="passes over the update's E*T samples, each reshuffled into minibatches (§3.5)")
    minibatch_size: int | None = Field(None, ge=1, description="samples per optimizer step; null = all E*T (one Adam step per epoch, the authors')")
    micro_batch_size: int = Field(8, ge=1, description="samples per forward/backward pass (gradient accumulation within a minibatch); memory only")
    clip: float = Field(0.1, gt=0, description="epsilon: the policy ratio is clipped to [1 - clip, 1 + clip] (§3.5)")
    value_clip: float = Field(0.1, gt=0, description="epsilon_v: the value loss is the larger of (V - R)^2 and (V_clip - R)^2, V_clip = V_old + clip(V - V_old, -epsilon_v, epsilon_v) (§3.5)")
    value_coef: float = Field(0.5, ge=0, description="c_v: weight of the value loss in the minibatch loss (§3.5)")
    critic_detached: bool = Field(
        False,
        description="the value head reads a detached copy of the final hidden state: the critic learns without its "
        "loss moving the shared backbone (the authors' critic is not detached; on a 100k-parameter model its "
        "value loss can outweigh the policy gradient)",
    )
    value_warmup_updates: int = Field(
        0, ge=0,
        description="PPO: first updates that train the value head alone (no policy term, backbone not stepped), "
        "so a fresh critic predicts returns before its advantages steer the policy; they count in rl.num_updates",
    )
    max_grad_norm: float = Field(0.01, gt=0, description="global gradient-norm clip before each Adam step (the authors' 0.01 is for 11B parameters)")
    gamma: float = Field(0.9, ge=0, le=1, description="discount of the returns over an environment's attempts (§3.3)")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of generalised advantage estimation (§3.3)")
    learning_rate: float = Field(1e-6, gt=0, description="eta_0: Adam's learning rate at update 0, annealed by a cosine (§3.5)")
    lr_min: float = Field(1e-9, ge=0, description="eta_min: the cosine's floor")
    lr_t_max: int | None = Field(None, ge=1, description="cosine period in updates; null = rl.num_updates")
    adam_epsilon: float = Field(1e-7, gt=0, description="Adam's epsilon; interacts with max_grad_norm (§3.5)")
    thought_coef: float = Field(0.5, ge=0, description="weight of the text before the task's action key (GeneralPoints `\"formula\":`, V-IRL `\"action\":`) in the sequence score (§3.4)")
    cut_gae_at_truncation: bool = Field(False, description="end the return at a truncated episode (mask 0); false = the authors' bootstrap across it (§3.3)")
    compute_dtype: Literal["float32", "bf16"] = Field("float32", description="dtype of log-probabilities, value head and losses; bf16 = the authors' (deviation 14)")


class GrpoSection(Section):
    """TRL's GRPOTrainer (training.md §4): defaults explicit here, TRL's for the rest."""

    reward: Literal["table", "binary"] = Field("table", description="table = the verifier's reward (GP §7); binary = 1 if correct else 0")
    learning_rate: float = Field(1e-6, gt=0, description="TRL's learning rate (linear decay over rl.num_updates steps)")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the starting model; 0 = no reference model (as the authors' PPO)")
    num_generations: int = Field(8, ge=2, description="completions per prompt: the group whose rewards are compared")
    per_device_batch_size: int = Field(8, ge=1, description="completions per device per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps per optimizer step")
    decoding: GrpoDecodingSection = Field(GrpoDecodingSection(), description="how completions are sampled (max_new_tokens = TRL's max_completion_length); seed = the run's seed")
    # TRL 1.16's token-level losses; `luspo` needs sequence-level importance sampling, not exposed here
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo"] = Field("dapo", description="TRL's loss formulation (GRPOConfig.loss_type)")
    epsilon: float = Field(0.2, gt=0, description="ratio clip of TRL's surrogate loss")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="advantage scaling: by the group's std, the batch's, or none")
    num_iterations: int = Field(1, ge=1, description="optimisation passes per generation batch (TRL's mu)")
    lora: LoraSection = Field(LoraSection(), description="adapters instead of full fine-tuning")

    @model_validator(mode="after")
    def _groups(self) -> GrpoSection:
        if (self.per_device_batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError("num_generations: must divide per_device_batch_size x gradient_accumulation_steps")
        return self


class RlSection(Section):
    """RL from SFT checkpoints (training.md §3-§5)."""

    algorithm: Literal["ppo", "grpo"] = Field("ppo", description="ppo = the authors' PPO (rl.ppo, rl.decoding); grpo = TRL's GRPOTrainer (rl.grpo)")
    from_steps: Literal["all"] | list[int] = Field("all", description="SFT steps RL starts from; [] = no RL")
    seed: int = Field(0, ge=0, description="training-hand stream of the rollouts")
    save_steps: list[int] = Field([0, 5, 10, 20], min_length=1, description="updates to save; the run lasts to the last, which must be > 0 when RL runs")
    decoding: RlDecodingSection = Field(RlDecodingSection(), description="PPO's rollouts (GRPO samples with rl.grpo.decoding)")
    allow_greedy_rollouts: bool = Field(
        False,
        description="accept PPO rollouts with do_sample false; off by default: PPO's ratio and clip need samples, "
        "greedy rollouts give it argmax outputs only (no exploration). GRPO samples with rl.grpo.decoding",
    )
    adv_hist_bins: int = Field(40, ge=2, description="bins of rl_log's advantage histogram (plus two overflow bins)")
    adv_hist_range: float = Field(10.0, gt=0, description="the histogram spans [-range, range]")
    ppo: PpoSection = PpoSection()
    grpo: GrpoSection = GrpoSection()

    @field_validator("save_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        return _increasing(v)

    @model_validator(mode="after")
    def _runs(self) -> RlSection:
        if self.from_steps == []:  # no RL: nothing below is used
            return self
        if self.num_updates == 0:
            raise ValueError(f"save_steps: {self.save_steps} asks for a run of 0 updates; list at least one update > 0, or set rl.from_steps: [] for no RL")
        if self.algorithm == "ppo" and self.ppo.num_envs * self.ppo.steps_per_env < 2:
            raise ValueError("ppo.num_envs: num_envs x steps_per_env must be >= 2: advantages are normalised over the samples of an update")
        if self.algorithm == "grpo" and not self.grpo.decoding.resolved()["do_sample"]:
            raise ValueError(f"grpo.decoding.do_sample: GRPO compares sampled completions of one prompt; greedy decoding (preset {self.grpo.decoding.preset!r}) gives a group of identical ones")
        if self.algorithm == "ppo" and self.ppo.value_warmup_updates >= self.num_updates:
            raise ValueError(f"ppo.value_warmup_updates: {self.ppo.value_warmup_updates} warm-up updates leave none of the run's {self.num_updates} to train the policy")
        if self.algorithm == "ppo" and not self.decoding.resolved()["do_sample"] and not self.allow_greedy_rollouts:
            raise ValueError(
                f"decoding: rolls out greedily (do_sample false, preset {self.decoding.preset!r}), and PPO needs samples "
                "(training.md §3.2); use a sampling preset (rl_default, authors_rl_*) or do_sample: true, "
                "or set rl.allow_greedy_rollouts: true to run greedy rollouts anyway"
            )
        return self

    @property
    def num_updates(self) -> int:
        return self.save_steps[-1]


class RolesSection(Section):
    """Checkpoint roles of the analysis (analysis.md §1.2)."""

    b_step: int | None = Field(None, ge=1, description="override of B (default: the SFT step with the best OOD accuracy)")
    rl_start: int | None = Field(None, ge=0, description="SFT step whose RL run gives R (default: the last SFT step)")


class SvdSection(Section):
    """SVD measurements (analysis.md §1-§3)."""

    include: list[str] = Field(
        [r"(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|cross_attn|mlp)\.(?P<module>q|k|v|o|gate|up|down)_proj\.weight"],
        description="regular expressions; a tensor whose whole name matches one (and no exclude) is analysed (§1.1)",
    )
    exclude: list[str] = Field([], description="regular expressions of tensor names left out")
    include_embeddings: bool = Field(False, description="also analyse (and, in the edit stage, edit) the input embedding; off as analysis.md §1.1")
    include_lm_head: bool = Field(False, description="also analyse (and edit) the lm_head; of a tied model this is the embedding, counted once")
    k: list[KSpec] = Field([0.0625, 0.125, 0.25], min_length=1, description="k-specs: int = absolute, float in (0,1] = fraction of r")
    columns: Literal["needed", "all"] = Field("needed", description="singular vectors stored: those the k-grids (and editing) read, or all (~2x the model in fp32)")
    batch_memory_gib: float = Field(4.0, gt=0, description="memory for one batch of equal-shape matrices decomposed together")
    noise_control: bool = Field(True, description="also measure W_a + Gaussian noise of the same Frobenius norm as the change: the null level of every metric (§3.8)")

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"[{i}]: not a regular expression ({err})") from None
        return v


EditK = Annotated[int, Field(ge=0)] | Annotated[float, Field(gt=0, le=1)]
Role = Literal["base", "B", "S", "R"]


class EditVariant(Section):
    """One rotation-editing variant (analysis.md §4.1)."""

    method: Literal["copy", "swap_triplets", "swap_directions", "sv_only"] = Field(
        "swap_directions", description="what the donor gives the target (§4.1): copy = its whole matrix, swap_triplets = its (u, sigma, v) at the indices, "
        "swap_directions = its u and v with the target's sigma, sv_only = its sigma with the target's u and v",
    )
    k_top: EditK = Field(1.0, description="leading singular indices edited: int = absolute (clamped per matrix), float = fraction of each matrix's r")
    k_tail: EditK = Field(0, description="trailing singular indices edited, as k_top")
    layers: str | None = Field(None, description='"0-9,20-29" (inclusive layer indices) or "0-0.25" (fractions of the layer count, half-open); null = every layer')
    modules: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] | None = Field(None, description="projections edited; null = every selected matrix")
    donor: Role = Field("B", description="checkpoint role the edit takes from (analysis.md §1.2)")
    target: Role = Field("S", description="checkpoint role that is edited and evaluated")


class EditSection(Section):
    """Rotation-editing experiments (analysis.md §4)."""

    enabled: bool = Field(True, description="run the edit stage")
    grid: Literal["default", "authors", "small", "none"] = Field("default", description="built-in variant grid (§4.3); `none` = only `variants`")
    variants: list[EditVariant] = Field([], description="variants added to the grid")
    reference_compat: bool = Field(False, description="reproduce the authors' quirks (§4.2)")
    keep_checkpoints: bool = Field(False, description="write every edited model as a full checkpoint")
    bootstrap_resamples: int = Field(2000, ge=100, description="paired bootstrap resamples of the recovery fraction's interval (§4.4)")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap")

    @model_validator(mode="after")
    def _compat_absolute(self) -> EditSection:
        if self.reference_compat:
            for i, v in enumerate(self.variants):
                for name in ("k_top", "k_tail"):
                    if isinstance(getattr(v, name), float):
                        raise ValueError(f"variants[{i}].{name}: reference_compat takes absolute k only (quirk 2), got {getattr(v, name)}")
        return self


class RunnerSection(Section):
    """Where tasks run: in the flow's process (local) or on a Dask cluster via prefect-dask."""

    kind: Literal["local", "dask"] = Field("local", description="local = threads in the flow's process; dask = prefect-dask's DaskTaskRunner (processes)")
    address: str | None = Field(None, description="scheduler address of an existing Dask cluster; null = start a LocalCluster")
    n_workers: int = Field(2, ge=1, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, description="tasks one LocalCluster worker runs at once")
    gpus_per_task: int = Field(0, ge=0, description="GPU work is pinned through the worker resource GPU")


DriftSignal = Literal["js", "kl_forward", "kl_reverse", "sequence_kl", "cosine_distance"]


class DriftSection(Section):
    """The label-free forgetting monitor (issue 19, docs/monitor.md): each checkpoint's drift
    from the base and from the checkpoint before it, on the evaluation prompts, no answers."""

    enabled: bool = Field(False, description="run the drift stage and judge the monitor finding (off by default; configs/toy.yaml turns it on)")
    prompts: int | None = Field(None, ge=4, description="prompts per split, the first of each evaluation set (default: all of them; analysis.md §5 asks for >= 300)")
    batch_size: int = Field(32, ge=1, description="prompts per forward pass")
    signal: DriftSignal = Field("js", description="the drift the stopping rule reads, mean over the OOD prompts at the answer anchor (cosine_distance: 1 - the hidden states' cosine)")
    rho: float = Field(0.5, gt=0, lt=1, description="the rule stops before the first interval whose ID gain per unit of drift is below rho x the best so far (fixed before any result: docs/monitor.md)")


class StudyConfig(Section):
    """A whole study. `store` is where every artifact lives (created on first run)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the study's name in the store (studies/<name>/); one name, one config")]
    store: str = Field("store", description="the artifact store's folder (created on the first run); --store overrides it")
    task: Literal["generalpoints", "virl"] = Field("generalpoints", description="the benchmark every stage plays (tasks/benchmark.py): generalpoints, the make-24 card game; virl, V-IRL language navigation")
    model: ModelSection = ModelSection(builtin="tiny")
    pretrain: PretrainSection = PretrainSection()
    chat: ChatSection = ChatSection()
    verifier: VerifierSection = VerifierSection()
    data: DataSection = DataSection()
    virl: VirlSection = VirlSection()
    sft: SftSection = SftSection()
    eval: EvalSection = EvalSection()
    rl: RlSection = RlSection()
    roles: RolesSection = RolesSection()
    svd: SvdSection = SvdSection()
    edit: EditSection = EditSection()
    drift: DriftSection = DriftSection()
    runner: RunnerSection = RunnerSection()

    def claim(self) -> dict[str, Any]:
        """What a study name stands for in its store (`Store.claim_study`): every field that can
        change its results. Not the store's location, nor the runner, which decides where and
        when tasks run, not what they compute (a thread runner and a Dask cluster write the
        same tables)."""
        return self.model_dump(mode="json", exclude={"store", "runner"})

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        # issue 16 gave each stage one name; a config written before says where its section went
        if isinstance(data, dict) and "editing" in data:
            raise ValueError("editing: the section is now called edit (one name per stage: config, module, store folder, tables)")
        return data

    @model_validator(mode="after")
    def _relations(self) -> StudyConfig:
        if self.pretrain.enabled and not self.model.builtin:
            raise ValueError("pretrain.enabled: pretraining is for builtin models only; a Hugging Face model comes pretrained")
        if self.rl.seed == self.data.eval_seed:
            raise ValueError(f"rl.seed: must differ from data.eval_seed ({self.data.eval_seed}) so the hand streams are disjoint")
        if self.rl.from_steps != "all":
            for i, step in enumerate(self.rl.from_steps):
                if step not in self.sft.save_steps:
                    raise ValueError(f"rl.from_steps[{i}]: {step} is not one of sft.save_steps {self.sft.save_steps}")
        if self.roles.b_step is not None and self.roles.b_step not in self.sft.save_steps:
            raise ValueError(f"roles.b_step: {self.roles.b_step} is not one of sft.save_steps")
        if self.roles.rl_start is not None and self.roles.rl_start not in self.sft.save_steps:
            raise ValueError(f"roles.rl_start: {self.roles.rl_start} is not one of sft.save_steps")
        return self

    @model_validator(mode="after")
    def _sft_fits_data(self) -> StudyConfig:
        needed = self.sft.max_steps * self.sft.batch_size
        if needed > self.data.train_size:
            raise ValueError(
                f"data.train_size: {self.data.train_size} rows cannot feed {self.sft.max_steps} SFT steps "
                f"at batch {self.sft.batch_size} (needs {needed}); hands are used once, in index order"
            )
        return self


# ---------------------------------------------------------------------------- every field, explained


def _type_name(t: Any) -> str:
    """A field's type as a config file's author reads it: `int | None`, `'ppo' | 'grpo'`, `list[str]`."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Annotated:
        return _type_name(args[0])  # the constraints are in the description
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if t is type(None) else getattr(t, "__name__", str(t))


def explain_fields(model: type[BaseModel] = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted field, type, default, description) of every field of the study config, sections
    expanded in place: what `rlheal validate --explain` prints and docs/config.md lists."""
    model = model or StudyConfig
    rows = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            rows.append((path, "section", "", " ".join((info.description or ann.__doc__ or "").split("\n\n")[0].split())))
            rows += explain_fields(ann, path + ".")
            continue
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        rows.append((path, _type_name(ann), default, info.description or ""))
        item = typing.get_args(ann)[0] if typing.get_origin(ann) is list else None
        if isinstance(item, type) and issubclass(item, Section):  # a list of sections: its entries' fields
            rows += explain_fields(item, path + "[].")
    return rows


def explain_markdown() -> str:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for path, typ, default, doc in explain_fields():
        cell = lambda x: x.replace("|", "\\|")  # noqa: E731
        lines.append(f"| `{path}` | {cell(typ)} | {cell(default)} | {cell(doc)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- loading


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # drop pydantic's union-member tags ("constrained-int", "literal['all']") from the path
        path = _field_path(tuple(p for p in e["loc"] if isinstance(p, int) or p.isidentifier()))
        msg = e["msg"].removeprefix("Value error, ")
        # Validators report a sub-location as a "[i]: ..." or "field: ..." prefix.
        if m := re.match(r"^(\[\d+\]|[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*|\[\d+\])*): (.*)$", msg, re.S):
            sub, msg = m.groups()
            path = path + sub if sub.startswith("[") else (f"{path}.{sub}" if path else sub)
        lines.append(f"{path or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> StudyConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid study config\n{format_validation_error(err)}") from None


def apply_overrides(data: Any, overrides: Sequence[str], source: str = "--set") -> Any:
    """`section.field=value` assignments (value read as YAML) applied to the raw config
    tree before validation, so an override is checked exactly like the file's own values."""
    if not overrides:
        return data
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq or not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", dotted.strip()):
            raise ConfigError(f"{source} {item!r}: expected FIELD=VALUE with a dotted field path, e.g. sft.learning_rate=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} {dotted}: value {raw!r} is not valid YAML ({getattr(err, 'problem', None) or err})") from None
        *parents, leaf = dotted.strip().split(".")
        node = data
        for i, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source} {dotted}: {'.'.join(parents[: i + 1])} is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path, store: str | Path | None = None, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read and validate a study YAML; `store` overrides the file's store location and
    `overrides` (`field.path=value`) any other field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason}); save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', None) or err}") from None
    cfg = parse_config(apply_overrides(data, overrides), str(path) + (" with --set " + " ".join(overrides) if overrides else ""))
    if store is not None:
        cfg = cfg.model_copy(update={"store": str(store)})
    return cfg

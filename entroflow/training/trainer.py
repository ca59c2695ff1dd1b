"""GRPO / Dr.GRPO / MaxEnt-GRPO with LoRA on TRL's GRPOTrainer, checkpoints in the HF layout.

Each checkpoint-{step}/ holds what the Trainer writes (adapter, optimizer.pt, scheduler.pt,
trainer_state.json, rng state) plus `optimizer_param_names.json`: the parameter names in the
optimizer's order, so the AdamW state can be mapped back to named LoRA tensors later.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.integrations import TensorBoardCallback
from trl import GRPOConfig, GRPOTrainer

from entroflow.config import schema_defaults
from entroflow.errors import EntroflowError
from entroflow.estimators.delta_h import score_sequences
from entroflow.lm.checkpoints import PARAM_NAMES_FILE
from entroflow.lm.precision import Precision
from entroflow.training.algorithms import algorithm
from entroflow.training.infoseed import (
    InfoSeedSettings,
    pool_hidden,
    seed_terms,
    seeded_prompt,
    slot_seeds,
)
from entroflow.training.maxent import (
    MaxEntController,
    maxent_advantages,
    weight_entropy,
    weight_logits,
    weights_from_logits,
)
from entroflow.training.rollout import Rollout, advantages_array, make_rollout
from entroflow.training.settings import RunSettings

log = logging.getLogger(__name__)

MAXENT_STATE_FILE = "maxent_state.json"
TENSORBOARD_DIR = "tensorboard"  # in the run's folder, beside checkpoint-*/ and trace/
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard (in the train extra: pip install -e '.[train]')",
    "wandb": "wandb (pip install wandb; WANDB_MODE=offline logs without an account)",
}


def check_trackers(report_to: list[str]) -> None:
    """One line naming `report_to` when a chosen tracker's package is not installed."""
    for name in report_to:
        if name not in TRACKER_PACKAGES:
            raise EntroflowError(
                f"report_to: unknown tracker {name!r}; choose from {', '.join(TRACKER_PACKAGES)}"
            )
        if importlib.util.find_spec(name) is None:
            raise EntroflowError(f"report_to: {name} needs the package {TRACKER_PACKAGES[name]}")


def optimizer_param_names(named_parameters, optimizer) -> list[list[str]]:
    """Names of the optimizer's parameters, group by group, in its own order."""
    names = {id(p): n for n, p in named_parameters}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


class EntroflowGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with entroflow's one hook into TRL's rollouts, and named optimizer state.

    The only place entroflow overrides TRL's private rollout methods: after TRL has generated,
    rewarded and scored a training batch, it builds the step's `Rollout` once (training.rollout),
    lets the algorithm replace the advantages (`rollout_advantages`, MaxEnt-GRPO), and hands the
    rollout to every callback that defines `on_rollout(trainer, rollout)`. Its checkpoints also
    record the optimizer's parameter names.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_rollout: Rollout | None = None
        self._rewards_per_func: np.ndarray | None = None

    def _calculate_rewards(self, inputs, *args, **kwargs):
        per_func = super()._calculate_rewards(inputs, *args, **kwargs)  # (B, n_funcs), NaN: abstain
        # TRL gathers the rewards of all processes; this process's rollout is its own slice
        # (whole groups: each process's batch is prompts_per_step groups of group_size).
        rank = self.accelerator.process_index
        local = per_func[rank * len(inputs) : (rank + 1) * len(inputs)]
        self._rewards_per_func = local.detach().cpu().numpy()
        return per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        rollout = make_rollout(
            inputs, out, self._rewards_per_func, self.reward_weights.cpu(), self.num_generations
        )
        advantages = self.rollout_advantages(rollout)
        if advantages is not None:
            out["advantages"] = torch.as_tensor(
                advantages, dtype=out["advantages"].dtype, device=out["advantages"].device
            )
            rollout.advantages = advantages_array(out["advantages"])
        self.last_rollout = rollout
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "on_rollout"):
                callback.on_rollout(self, rollout)
        return out

    def rollout_advantages(self, rollout: Rollout) -> np.ndarray | None:
        """Advantages to use instead of TRL's group advantages (None: keep TRL's)."""
        return None

    def record_metrics(self, metrics: dict[str, float]) -> None:
        """Add values to this step's training metrics (averaged and logged with TRL's own)."""
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)

    def _checkpoint_dir(self, trial) -> str:
        return os.path.join(
            self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"
        )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            path = Path(self._checkpoint_dir(trial)) / PARAM_NAMES_FILE
            names = optimizer_param_names(self.named_trained_parameters(), self.optimizer)
            path.write_text(json.dumps(names, indent=1))

    def named_trained_parameters(self):
        """(name, parameter) of everything the optimizer may hold."""
        return self.model.named_parameters()


_MAXENT = schema_defaults("runs", "*", "maxent")


@dataclass
class MaxEntSettings:
    reward_temperature: float = _MAXENT["reward_temperature"]
    floor: float = _MAXENT["floor"]
    controller: MaxEntController = field(default_factory=MaxEntController)


class MaxEntGRPOTrainer(EntroflowGRPOTrainer):
    """MaxEnt-GRPO: replaces group-normalised advantages by listwise MaxEnt weights (see maxent.py)."""

    def __init__(
        self,
        *args,
        maxent: MaxEntSettings | None = None,
        accum_dtype: torch.dtype = torch.float32,  # precision.entropy_dtype
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.maxent = maxent or MaxEntSettings()
        self.accum_dtype = accum_dtype

    @torch.no_grad()
    def _sequence_logprobs(self, prompt_ids, completion_ids) -> np.ndarray:
        """S(y) = Σ_t log π(y_t | ...) of each completion under the current model, at T = 1."""
        out = np.zeros(len(completion_ids))
        keep = [i for i, c in enumerate(completion_ids) if c]  # an empty completion has S = 0
        scores = score_sequences(
            self.model,
            [prompt_ids[i] for i in keep],
            [completion_ids[i] for i in keep],
            pad_token_id=self.processing_class.pad_token_id,
            temperature=1.0,
            accum_dtype=self.accum_dtype,
        )
        out[keep] = [float(lp.double().sum()) for lp in scores.logprob]
        return out

    def rollout_advantages(self, rollout: Rollout) -> np.ndarray:
        """A_i = G w_i - 1 from the MaxEnt weights at the controller's τ, β; then update τ, β."""
        was_training = self.model.training
        self.model.eval()
        policy = self._sequence_logprobs(rollout.prompt_ids, rollout.completion_ids)
        with self.model.disable_adapter():
            reference = self._sequence_logprobs(rollout.prompt_ids, rollout.completion_ids)
        self.model.train(was_training)
        g = self.num_generations
        ctrl = self.maxent.controller
        z = weight_logits(
            rollout.rewards.reshape(-1, g),
            reference.reshape(-1, g),
            ctrl.tau,
            ctrl.beta,
            self.maxent.reward_temperature,
            self.maxent.floor,
        )
        w = weights_from_logits(z)
        kl = float(np.mean(policy - reference))
        if self.accelerator.num_processes > 1:  # one controller: every rank steps it alike
            z, kl = self._gathered(z, kl)
        metrics = {
            "tau": ctrl.tau,  # the τ, β this step's weights were made with
            "beta": ctrl.beta,
            "weight_entropy": weight_entropy(w),
            "kl": kl,
            **ctrl.update(z, kl),  # delta_tau, delta_beta: the controller's step after it
        }
        rollout.metrics.update({f"maxent/{k}": v for k, v in metrics.items()})
        self.record_metrics({f"maxent/{k}": v for k, v in metrics.items()})
        return maxent_advantages(w)

    def _gathered(self, z: np.ndarray, kl: float) -> tuple[np.ndarray, float]:
        """All processes' weight logits (their groups stacked) and their mean KL."""
        device = self.accelerator.device
        z_all = self.accelerator.gather(torch.as_tensor(z, dtype=torch.float64, device=device))
        kl_all = self.accelerator.gather(torch.tensor([kl], dtype=torch.float64, device=device))
        return z_all.cpu().numpy(), float(kl_all.mean())

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            path = Path(self._checkpoint_dir(trial)) / MAXENT_STATE_FILE
            path.write_text(json.dumps(self.maxent.controller.state(), indent=1))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / MAXENT_STATE_FILE).exists():
            state = json.loads((Path(checkpoint) / MAXENT_STATE_FILE).read_text())
            self.maxent.controller = MaxEntController.from_state(state)


SEED_HEAD_FILE = "seed_head.safetensors"  # InfoSeed-GRPO's seed head (loss ce), per checkpoint
SEED_HEAD_PREFIX = "infoseed.seed_head."  # its parameters' names in optimizer_param_names.json


class InfoSeedGRPOTrainer(EntroflowGRPOTrainer):
    """InfoSeed-GRPO (training.infoseed): seeds the prompts of each group's slots, and adds the
    seed-aware loss and the entropy term to TRL's GRPO loss, from the loss pass's own last-layer
    hidden states and token entropies. With loss `ce` its linear seed head trains in the same
    AdamW and is saved beside the adapter (SEED_HEAD_FILE)."""

    def __init__(self, *args, infoseed: InfoSeedSettings | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.infoseed = infoseed or InfoSeedSettings()
        self.seed_head = None
        if self.infoseed.loss == "ce":
            hidden = self.model.config.get_text_config().hidden_size
            device = next(self.model.parameters()).device
            # TRL seeds each rank differently (set_seed(device_specific=True)), and DDP does not
            # broadcast a module outside the model: draw the head from the run's seed alone.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.args.seed)
                self.seed_head = torch.nn.Linear(hidden, self.infoseed.seeds).to(device)
        self._capture: dict | None = None  # filled while the loss pass runs
        self._backbone().register_forward_hook(self._keep_hidden)

    def _backbone(self):
        """The decoder stack whose output is the last layer's hidden states (B, T, d)."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        return model.base_model

    def _keep_hidden(self, module, args, output):
        if self._capture is not None:
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            self._capture["hidden"].append(hidden)

    def _generate_and_score_completions(self, inputs):
        if self.model.training:  # consecutive groups of num_generations slots
            seeds = slot_seeds(
                len(inputs), self.num_generations, self.infoseed.seeds, self.infoseed.original
            )
            inputs = [
                {**x, "prompt": seeded_prompt(x["prompt"], seed, self.infoseed.template)}
                for x, seed in zip(inputs, seeds, strict=True)
            ]
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            out["seed_ids"] = torch.tensor(seeds, device=out["completion_ids"].device)
            self.last_rollout.seed = np.asarray(seeds, dtype=np.int32)  # for the trace
        return out

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(
            *args, **kwargs
        )  # (logps, entropies, ...)
        if self._capture is not None:
            self._capture["entropies"] = result[1]  # (B, C), with gradient
        return result

    def _compute_loss(self, model, inputs):
        if "seed_ids" not in inputs:  # not a training batch
            return super()._compute_loss(model, inputs)
        self._capture = {"hidden": []}
        try:
            loss = super()._compute_loss(model, inputs)
            captured = self._capture
        finally:
            self._capture = None
        if not captured["hidden"] or captured.get("entropies") is None:
            raise EntroflowError(
                "infoseed_grpo: TRL's loss pass did not run through the model's backbone with "
                "entropies (a TRL version this trainer does not know)"
            )
        mask = inputs["completion_mask"]  # (B, C)
        hidden = torch.cat(captured["hidden"])[:, -mask.size(1) :]  # completion positions
        pooled = pool_hidden(hidden, mask, self.infoseed.pooling)  # (B, d)
        terms = seed_terms(
            self.infoseed,
            pooled,
            captured["entropies"],
            mask,
            inputs["seed_ids"],
            head=self.seed_head,
        )
        metrics = {f"infoseed/{k}": v for k, v in terms.metrics.items()}
        self.record_metrics(metrics)
        if self.last_rollout is not None:
            self.last_rollout.metrics.update(metrics)
        if terms.loss is None:
            return loss
        return loss + terms.loss / self.current_gradient_accumulation_steps

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.seed_head is not None:  # its own group, no weight decay, the run's learning rate
            head = list(self.seed_head.parameters())
            if not any(p is head[0] for g in optimizer.param_groups for p in g["params"]):
                optimizer.add_param_group({"params": head, "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch):
        # The head is outside the model: the Trainer's model.zero_grad() and DDP do not reach it.
        if (
            self.seed_head is not None
            and self._step % self.current_gradient_accumulation_steps == 0
        ):
            self.seed_head.zero_grad(set_to_none=True)  # a new accumulation window
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.seed_head is not None and self.accelerator.num_processes > 1:
            for p in self.seed_head.parameters():  # every rank reduces, with or without a grad
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad = self.accelerator.reduce(grad, reduction="mean")
        return loss

    def named_trained_parameters(self):
        yield from super().named_trained_parameters()
        if self.seed_head is not None:
            for name, p in self.seed_head.named_parameters():
                yield SEED_HEAD_PREFIX + name, p

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save and self.seed_head is not None:
            from safetensors.torch import save_file

            state = {
                k: v.detach().cpu().contiguous() for k, v in self.seed_head.state_dict().items()
            }
            save_file(state, Path(self._checkpoint_dir(trial)) / SEED_HEAD_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and self.seed_head is not None:
            from safetensors.torch import load_file

            path = Path(checkpoint) / SEED_HEAD_FILE
            if not path.exists():
                raise EntroflowError(f"{checkpoint}: no {SEED_HEAD_FILE} to resume the seed head")
            self.seed_head.load_state_dict(
                load_file(path, device=str(self.seed_head.weight.device))
            )
        super()._load_optimizer_and_scheduler(checkpoint)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The highest checkpoint-{step} folder that has its trainer state (complete saves only)."""
    done = [p for p in Path(output_dir).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def mixed_precision(dtype: str | None) -> dict:
    """The trainer's autocast on CUDA for the run's runtime dtype (precision.dtype): bf16 for
    auto / null / bfloat16 (where supported), fp16 for float16, none for float32."""
    cuda = torch.cuda.is_available()
    return {
        "bf16": cuda and dtype in (None, "auto", "bfloat16") and torch.cuda.is_bf16_supported(),
        "fp16": cuda and dtype == "float16",
    }


def grpo_config(settings: RunSettings, output_dir: str, reward_weights: list[float]) -> GRPOConfig:
    """TRL's arguments for a run: its algorithm's loss and reward scaling (training.algorithms)."""
    algo = algorithm(settings.algorithm)
    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=settings.prompts_per_step * settings.group_size,
        num_generations=settings.group_size,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="constant",
        max_steps=settings.steps,
        save_steps=settings.save_every,
        save_strategy="steps",
        logging_steps=1,
        beta=settings.beta,
        loss_type=algo.loss_type,
        scale_rewards=algo.scale_rewards,
        reward_weights=reward_weights,
        use_cpu=not torch.cuda.is_available(),
        # several processes (training.launch): NCCL between GPUs, gloo between CPU processes
        ddp_backend=None if torch.cuda.is_available() or settings.processes == 1 else "gloo",
        **mixed_precision(settings.precision.get("dtype")),
        report_to=list(settings.report_to),
        disable_tqdm=True,
        seed=settings.seed,
        data_seed=settings.seed,
    )


def lora_config(settings: RunSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        target_modules=settings.lora_targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def build_trainer(
    settings: RunSettings,
    model,
    tokenizer,
    train_dataset,
    output_dir: str,
    reward_funcs: list | None = None,
) -> EntroflowGRPOTrainer:
    """The run's trainer. `reward_funcs` (TRL signature, weight 1 each) replace the math rewards."""
    from entroflow.training.rewards import make_reward_funcs

    algo = algorithm(settings.algorithm)  # an unknown name fails here, before any model work
    check_trackers(settings.report_to)
    if reward_funcs is None:
        reward_funcs, reward_weights = make_reward_funcs(settings.format_reward)
    else:
        reward_weights = [1.0] * len(reward_funcs)
    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: lora.quantize
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    kwargs = dict(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_config(settings, output_dir, reward_weights),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(settings),
    )
    if settings.algorithm == "infoseed_grpo":
        trainer = InfoSeedGRPOTrainer(**kwargs, infoseed=InfoSeedSettings(**settings.infoseed))
    elif algo.listwise:
        m = dict(settings.maxent)
        controller = MaxEntController(**m.pop("controller", {}))
        trainer = MaxEntGRPOTrainer(
            **kwargs,
            maxent=MaxEntSettings(**m, controller=controller),
            accum_dtype=Precision.of(settings.precision).entropy_torch_dtype,
        )
    else:
        trainer = EntroflowGRPOTrainer(**kwargs)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):  # else in output_dir/runs/<time_host>/
            callback.logging_dir = str(Path(output_dir) / TENSORBOARD_DIR)
    return trainer


def run_metadata(settings: RunSettings, model_path: str) -> dict:
    return {"model_path": model_path, **asdict(settings)}

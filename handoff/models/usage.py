"""What a hop spends (`Usage`: model tokens and calls, and their cost), what a chain may spend
(`Budget`), and what it has left (`BudgetLeft`). Agents report usage; the chain workflow adds it
up and prices it from the budget's own table, so a chain's accounts replay exactly."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MODELS = 32
"""Most models one usage names (more are folded into `OTHER_MODEL`)."""
MAX_MODEL_NAME_CHARS = 128
MAX_COUNT = 10**12
"""Bound of every count and cost: far over any real spend, well inside a float's exact integers."""
OTHER_MODEL = "(other)"
MAX_DURATION_S = 7 * 24 * 3600.0


class ModelUsage(BaseModel):
    """One model's tokens and calls."""

    model_config = ConfigDict(allow_inf_nan=False)

    prompt_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    completion_tokens: int = Field(default=0, ge=0, le=MAX_COUNT)
    model_calls: int = Field(default=0, ge=0, le=MAX_COUNT)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Usage(ModelUsage):
    """What a hop, an agent or a chain spent: tokens and model calls in all and by model, and
    their cost in the budget's currency (the priced tokens, plus any cost an agent reported)."""

    cost: float = Field(default=0.0, ge=0, le=MAX_COUNT)
    by_model: dict[str, ModelUsage] = Field(default_factory=dict)

    @field_validator("by_model")
    @classmethod
    def _bounded(cls, value: dict[str, ModelUsage]) -> dict[str, ModelUsage]:
        if len(value) <= MAX_MODELS and all(0 < len(name) <= MAX_MODEL_NAME_CHARS for name in value):
            return value
        kept: dict[str, ModelUsage] = {}
        for name, usage in value.items():
            if len(kept) < MAX_MODELS - 1 and 0 < len(name) <= MAX_MODEL_NAME_CHARS:
                kept[name] = usage
            else:
                kept[OTHER_MODEL] = _sum(kept.get(OTHER_MODEL, ModelUsage()), usage)
        return kept

    @property
    def empty(self) -> bool:
        return not (self.tokens or self.model_calls or self.cost)

    def plus(self, other: Usage) -> Usage:
        models = dict(self.by_model)
        for name, usage in other.by_model.items():
            models[name] = _sum(models.get(name, ModelUsage()), usage)
        total = _sum(self, other)
        return Usage(**total.model_dump(), cost=min(self.cost + other.cost, MAX_COUNT), by_model=models)


def _sum(a: ModelUsage, b: ModelUsage) -> ModelUsage:
    return ModelUsage(prompt_tokens=min(a.prompt_tokens + b.prompt_tokens, MAX_COUNT),
                      completion_tokens=min(a.completion_tokens + b.completion_tokens, MAX_COUNT),
                      model_calls=min(a.model_calls + b.model_calls, MAX_COUNT))


def model_usage(model: str, prompt_tokens: int, completion_tokens: int, model_calls: int) -> Usage:
    """One model's usage, as a `Usage`."""
    one = ModelUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model_calls=model_calls)
    return Usage(**one.model_dump(), by_model={model[:MAX_MODEL_NAME_CHARS] or OTHER_MODEL: one})


class Price(BaseModel):
    """A model's price per million tokens, in the budget's currency."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    prompt: float = Field(default=0.0, ge=0, le=10**6)
    completion: float = Field(default=0.0, ge=0, le=10**6)


class Budget(BaseModel):
    """What a chain may spend, every branch included. A hop that would start with a limit reached
    is refused and its chain (or branch) ends `budget_exceeded`; a hop still running when
    `max_duration_s` is reached is cut short."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    """Prompt and completion tokens, every model's."""
    max_cost: float | None = Field(default=None, gt=0, le=MAX_COUNT)
    """In `currency`, from `prices` (and any cost an agent reports itself)."""
    max_model_calls: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    max_duration_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    """The whole chain's wall-clock time."""
    currency: str = Field(default="USD", min_length=1, max_length=8)
    prices: dict[str, Price] = Field(default_factory=dict, max_length=MAX_MODELS * 4)
    """Per model name, per million tokens. The client fills it from the deployment's
    `HANDOFF_PRICES` when a budget names none; a model with no price costs nothing here."""

    def cost_of(self, usage: Usage) -> float:
        """What `usage`'s tokens cost at `prices`."""
        cost = 0.0
        for name, spent in usage.by_model.items():
            price = self.prices.get(name)
            if price is not None:
                cost += (spent.prompt_tokens * price.prompt + spent.completion_tokens * price.completion) / 1e6
        return cost

    def priced(self, usage: Usage) -> Usage:
        """`usage` with the cost of its tokens added to any cost it reported."""
        return usage.model_copy(update={"cost": min(usage.cost + self.cost_of(usage), MAX_COUNT)})

    def left(self, spent: Usage, elapsed_s: float) -> BudgetLeft:
        return BudgetLeft(
            tokens=None if self.max_tokens is None else max(self.max_tokens - spent.tokens, 0),
            cost=None if self.max_cost is None else max(self.max_cost - spent.cost, 0.0),
            model_calls=None if self.max_model_calls is None else max(self.max_model_calls - spent.model_calls, 0),
            seconds=None if self.max_duration_s is None else max(self.max_duration_s - elapsed_s, 0.0),
            currency=self.currency,
        )

    def reached(self, spent: Usage, elapsed_s: float) -> str | None:
        """Which limit `spent` (after `elapsed_s` of the chain) has reached, in words; None if none."""
        if self.max_tokens is not None and spent.tokens >= self.max_tokens:
            return f"the chain's budget of {self.max_tokens:,} tokens is used up ({spent.tokens:,} spent)"
        if self.max_cost is not None and spent.cost >= self.max_cost:
            return (f"the chain's budget of {self.max_cost:g} {self.currency} is used up "
                    f"({spent.cost:.6g} spent)")
        if self.max_model_calls is not None and spent.model_calls >= self.max_model_calls:
            return f"the chain's budget of {self.max_model_calls:,} model calls is used up"
        if self.max_duration_s is not None and elapsed_s >= self.max_duration_s:
            return f"the chain's time budget of {self.max_duration_s:g} s is used up"
        return None


class BudgetLeft(BaseModel):
    """What a chain's budget leaves for the hop it is given to (None: no such limit)."""

    tokens: int | None = None
    cost: float | None = None
    model_calls: int | None = None
    seconds: float | None = None
    currency: str = "USD"

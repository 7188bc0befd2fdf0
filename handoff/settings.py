"""handoff's environment settings: every `HANDOFF_*` variable is read here, by pydantic-settings,
and documented once (docs/cli.md, "Environment variables"). Values are read when asked for (`settings()`),
so a process sees its environment as it is then. Each part parses what it needs of them and says
what is wrong in its own terms (`CodecConfigError`, `StorageError`, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "HANDOFF_"


class Settings(BaseSettings):
    """The `HANDOFF_*` variables, as text (empty when unset)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    compression_threshold: str = ""
    """zlib-compress payloads over this many bytes (default 262144); `off`: never."""
    encryption_keys: str = Field(default="", repr=False)
    """`id:<base64 of 32 bytes>` entries, comma separated: AES-256-GCM for every payload."""
    encryption_key_id: str = ""
    """The key that encrypts new payloads (required with several keys)."""
    encryption_strict: str = ""
    """With keys: refuse payloads that are not encrypted (default on; `off` accepts them)."""
    payload_dir: str = ""
    """Where payloads over 256 KiB go (content-addressed files); `off`: nowhere."""
    payload_retention_days: str = ""
    """Blobs neither stored nor read for this many days are swept (default 7)."""
    s3_bucket: str = ""
    """Large payloads go to this S3 bucket (takes precedence over the directory)."""
    s3_endpoint_url: str = ""
    """An S3-compatible server's endpoint."""
    log_task_text: str = ""
    """`off`: hop log lines leave out the task text."""
    identity: str = ""
    """Who `handoff approve` and `handoff reject` say decided, unless `--by` does."""
    ui_url: str = ""
    """The Temporal Web UI's base URL in the links handoff prints (default the embedded UI's)."""
    a2a_tokens: str = Field(default="", repr=False)
    """Bearer tokens the A2A server accepts, comma separated: each caller sees its own tasks."""
    a2a_operator_tokens: str = Field(default="", repr=False)
    """Bearer tokens of A2A operators, comma separated: they see and decide every chain."""
    a2a_push_hosts: str = ""
    """Hosts A2A push-notification webhooks may be on, comma separated (`*`: any public host);
    unset: no push notifications."""
    a2a_push_http: str = ""
    """`on`: webhooks may also be plain http URLs (default off: https only)."""
    a2a_push_private: str = ""
    """`on`: webhooks may also be on loopback, link-local, private or reserved addresses (default off)."""
    prices: str = ""
    """Model prices for chain budgets, as JSON: `{"MODEL": {"prompt": P, "completion": C}}`, per
    million tokens in the budget's currency; a budget that names no prices gets these."""
    codec_tokens: str = Field(default="", repr=False)
    """Bearer tokens the codec server accepts, comma separated."""
    mcp_tokens: str = Field(default="", repr=False)
    """Bearer tokens `handoff mcp --http` accepts, comma separated: each caller sees its own chains."""
    mcp_operator_tokens: str = Field(default="", repr=False)
    """Bearer tokens of MCP operators, comma separated: they see and decide every chain."""
    console_tokens: str = Field(default="", repr=False)
    """Tokens people sign in to the console with, comma separated, each `NAME=TOKEN` (the name
    decisions are recorded under)."""
    console_proxy_header: str = ""
    """A header naming the signed-in person, set by a reverse proxy in front of the console
    (e.g. `X-Forwarded-User`); believed only from `HANDOFF_CONSOLE_PROXY_ADDRESSES`."""
    console_proxy_addresses: str = ""
    """The addresses the console's reverse proxy connects from, comma separated."""
    console_roles: str = ""
    """Console roles, comma separated: `NAME=viewer`, `NAME=approver` (`NAME=approver:SCOPE|SCOPE`:
    only hops to those agents or capabilities), `NAME=operator`; anyone else is a viewer."""
    console_secret: str = Field(default="", repr=False)
    """The key the console signs its session cookies with (default: new at each start, which
    signs everyone out when it restarts; set it when several console processes serve one site)."""

    @classmethod
    def env_name(cls, field: str) -> str:
        """The variable a field is read from: `HANDOFF_<FIELD>`."""
        if field not in cls.model_fields:
            raise KeyError(field)
        return f"{PREFIX}{field.upper()}"


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings as the process's environment holds them now (or as `environ` does)."""
    if environ is None:
        return Settings()
    values = {name: environ[Settings.env_name(name)] for name in Settings.model_fields
              if Settings.env_name(name) in environ}
    return Settings.model_validate(values)


def switched_on(value: str | None) -> bool:
    """An on/off setting: on unless it says off (`off`, `0`, `false`, `no`)."""
    return (value or "on").strip().lower() not in ("off", "0", "false", "no")


def token_list(value: str) -> tuple[str, ...]:
    """Comma-separated tokens, blanks left out."""
    return tuple(t.strip() for t in value.split(",") if t.strip())

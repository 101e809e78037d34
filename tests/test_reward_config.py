"""The rewards section of the config: misconfigured verifiers and literal tokens fail at validation,
naming the field and what to do (issue 11, findings 3, 4 and 7). Pure config code: no processes."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("overrides", "field", "advice"),
    [
        (["rewards.verifier=custom"], "rewards.custom_function", "package.module:function"),
        (["rewards.verifier=remote"], "rewards.remote_url", "duet serve-reward"),
        (
            ["rewards.verifier=custom", "rewards.custom_function=not-a-path"],
            "rewards.custom_function",
            "look like",
        ),
        (["rewards.verifier=remote", "rewards.remote_url=localhost:8765"], "rewards.remote_url", "http://"),
    ],
)
def test_misconfigured_verifier_fails_at_validation(overrides: list[str], field: str, advice: str) -> None:
    """Before, these ran and scored every item 0 (`error: ...`) for the whole run."""
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert field in str(e.value) and advice in str(e.value)


def test_configured_verifiers_pass() -> None:
    cfg = load_config(None, ["rewards.verifier=custom", "rewards.custom_function=mypkg.scoring:score"])
    assert cfg.rewards.custom_function == "mypkg.scoring:score"
    cfg = load_config(None, ["rewards.verifier=remote", "rewards.remote_url=https://rewards.internal:8765"])
    assert cfg.rewards.remote_url == "https://rewards.internal:8765"


def test_literal_reward_token_is_refused_without_echoing_it() -> None:
    """A token on the command line shows in `ps`, in config.yaml, in the job's entrypoint, and resume
    loses it (config.yaml stores it redacted): the config refuses it and says where to put it."""
    secret = "sk-planted-0123456789"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards.remote_url=http://127.0.0.1:8765", f"rewards.remote_token={secret}"])
    message = str(e.value)
    assert (
        "rewards.remote_token" in message and "remote_token_file" in message and "remote_token_env" in message
    )
    assert secret not in message
    assert (
        load_config(None, ["rewards.remote_token=null"]).rewards.remote_token is None
    )  # older config.yaml files

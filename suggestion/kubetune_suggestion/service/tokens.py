"""Per-trial tokens: an HMAC of the trial's identity with the server secret.

Nothing is stored: any replica holding the shared secret can check a token,
and a token for one trial is useless for any other.
"""

from __future__ import annotations

import hashlib
import hmac


def trial_token(secret: str, experiment_uid: str, number: int) -> str:
    """The token of trial ``number`` of ``experiment_uid`` (hex HMAC-SHA256)."""
    message = f"{experiment_uid}/{number}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def token_matches(secret: str, experiment_uid: str, number: int, token: str) -> bool:
    """Whether ``token`` is the trial's token (constant-time comparison)."""
    return hmac.compare_digest(trial_token(secret, experiment_uid, number), token)

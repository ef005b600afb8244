"""Verified playback tokens, remembered until they expire (issue 4: a hit pays for an Ed25519
signature check once per token, not once per segment).

Rules (pure; `now` is passed in):
- only tokens that passed `vodcore.tokens.verify` are stored, with their claims;
- a stored token is good for a request while: its video is the path's video, `now` is before its
  `exp`, its `kid` is still among the keys the edge holds (a key dropped from control's JWKS
  stops its tokens at the next key refresh), and it was issued at or after the video's
  revocation cutoff, if one is set (takedowns, issue 4);
- anything else is a miss, and the caller verifies the token in full (and fails it as before);
- bounded: least recently used tokens are forgotten first; expired ones are dropped as met.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Mapping

from vodcore.tokens import TokenClaims

DEFAULT_MAX_TOKENS = 100_000


class VerifiedTokens:
    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._tokens: OrderedDict[str, TokenClaims] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def get(
        self,
        token: str,
        video_id: str,
        now: float,
        kids: Container[str],
        cutoffs: Mapping[str, float] | None = None,
    ) -> TokenClaims | None:
        """The claims of a remembered token still good for `video_id` at `now`, else None."""
        claims = self._tokens.get(token)
        if claims is None:
            self.misses += 1
            return None
        if now >= claims.expires_at or claims.kid not in kids:
            del self._tokens[token]
            self.misses += 1
            return None
        if claims.video_id != video_id:
            self.misses += 1
            return None  # the full check refuses it (another video's token)
        cutoff = cutoffs.get(video_id) if cutoffs else None
        if cutoff is not None and claims.issued_at < cutoff:
            self.misses += 1
            return None
        self._tokens.move_to_end(token)
        self.hits += 1
        return claims

    def put(self, token: str, claims: TokenClaims) -> None:
        self._tokens[token] = claims
        self._tokens.move_to_end(token)
        while len(self._tokens) > self.max_tokens:
            self._tokens.popitem(last=False)

    def forget_video(self, video_id: str) -> int:
        """Drop every remembered token of a video (a takedown); returns how many."""
        victims = [t for t, c in self._tokens.items() if c.video_id == video_id]
        for t in victims:
            del self._tokens[t]
        return len(victims)

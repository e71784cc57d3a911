"""Users and their API tokens."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, or_, select, update

from models import ApiToken as TokenRow
from models import User as UserRow
from rpc_server.db.repositories.rows import UnitOfWorkConnection, as_utc
from rpc_server.domain.records import Actor
from rpc_server.domain.states import Scope

_FIND_ACTOR = (
    select(UserRow.id, UserRow.email, TokenRow.scope, TokenRow.expires_at)
    .join(TokenRow, TokenRow.user_id == UserRow.id)
    .where(
        TokenRow.token_hash == bindparam("token_hash"),
        TokenRow.revoked_at.is_(None),
        or_(TokenRow.expires_at.is_(None), TokenRow.expires_at > bindparam("now")),
    )
)
# PostgreSQL: FOR NO KEY UPDATE, which the KEY SHARE lock of a foreign key check (a
# purchase, registration or token referring to the user) does not wait for. SQLite has
# no row locks and needs none: its write transactions run one at a time.
_HOLD_USER = (
    select(UserRow.id).where(UserRow.id == bindparam("user_id")).with_for_update(key_share=True)
)
_USER_BY_EMAIL = select(UserRow.id).where(UserRow.email == bindparam("email"))
_INSERT_USER = insert(UserRow).returning(UserRow.id)
_TOKEN_BY_HASH = select(TokenRow.id).where(TokenRow.token_hash == bindparam("token_hash"))
_INSERT_TOKEN = insert(TokenRow)
_REVOKE_TOKEN = (
    update(TokenRow)
    .where(TokenRow.token_hash == bindparam("revoked_hash"), TokenRow.revoked_at.is_(None))
    .values(revoked_at=bindparam("now"))
    .returning(TokenRow.id)
)
_REVOKE_TOKENS_OF = (
    update(TokenRow)
    .where(TokenRow.user_id == _USER_BY_EMAIL.scalar_subquery(), TokenRow.revoked_at.is_(None))
    .values(revoked_at=bindparam("now"))
    .returning(TokenRow.id)
)


class SqlUserRepository:
    def __init__(self, connection: UnitOfWorkConnection):
        self.connection = connection

    async def find_actor(self, token_hash: str, *, now: datetime) -> Actor | None:
        result = await self.connection.execute(_FIND_ACTOR, {"token_hash": token_hash, "now": now})
        row = result.first()
        if row is None:
            return None
        expires_at = None if row[3] is None else as_utc(row[3])
        return Actor(row[0], row[1], Scope(row[2]), token_expires_at=expires_at)

    async def hold(self, user_id: int) -> None:
        await self.connection.execute(_HOLD_USER, {"user_id": user_id})

    async def ensure_user(self, email: str, *, is_staff: bool, now: datetime) -> int:
        user_id = await self.connection.scalar(_USER_BY_EMAIL, {"email": email})
        if user_id is None:
            user_id = await self.connection.scalar(
                _INSERT_USER, {"email": email, "is_staff": is_staff, "created_at": now}
            )
        assert user_id is not None
        return int(user_id)

    async def add_token(
        self,
        user_id: int,
        token_hash: str,
        *,
        scope: Scope,
        now: datetime,
        expires_at: datetime | None = None,
    ) -> bool:
        stored = await self.connection.scalar(_TOKEN_BY_HASH, {"token_hash": token_hash})
        if stored is not None:
            return False
        await self.connection.execute(
            _INSERT_TOKEN,
            {
                "user_id": user_id,
                "token_hash": token_hash,
                "scope": scope.value,
                "created_at": now,
                "expires_at": expires_at,
            },
        )
        return True

    async def revoke_token(self, token_hash: str, *, now: datetime) -> bool:
        result = await self.connection.execute(
            _REVOKE_TOKEN, {"revoked_hash": token_hash, "now": now}
        )
        return result.first() is not None

    async def revoke_tokens_of(self, email: str, *, now: datetime) -> int:
        result = await self.connection.execute(_REVOKE_TOKENS_OF, {"email": email, "now": now})
        return len(result.all())

"""Domain services: one function per use case, each one unit of work.

Called by the thin method handlers with already-validated arguments; raise the errors
of ``rpc_server.domain.errors``. Argument names match the params of the JSON-RPC
methods so that handlers can pass loaded params straight through.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from rpc_server.domain.errors import IdempotencyKeyReused, InvalidTransition, NotFound
from rpc_server.domain.links import FrontendLinks
from rpc_server.domain.ports import UnitOfWorkFactory
from rpc_server.domain.records import (
    Actor,
    Course,
    Fulfillment,
    Purchase,
    PurchasePage,
    Registration,
)
from rpc_server.domain.states import PurchaseState, Step, sources_of, step_for
from rpc_server.domain.tokens import hash_token, new_token

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_purchase_id() -> str:
    """Return an unguessable public id: 128 random bits as 32 characters of [0-9a-f]."""
    return secrets.token_hex(16)


def _visible_owner(actor: Actor) -> int | None:
    """Staff (the support desk) see every purchase; everyone else only their own."""
    return None if actor.is_staff else actor.user_id


async def authenticate(
    uow_factory: UnitOfWorkFactory, token: str, *, clock: Clock = utcnow
) -> Actor | None:
    """Return who holds ``token``, or None for an unknown, expired or revoked token."""
    async with uow_factory() as uow:
        return await uow.users.find_actor(hash_token(token), now=clock())


async def issue_token(
    uow_factory: UnitOfWorkFactory,
    email: str,
    *,
    is_staff: bool = False,
    token: str | None = None,
    expires_in: timedelta | None = None,
    clock: Clock = utcnow,
) -> str:
    """Create the user if needed and return a new token for it (shown this once).

    ``token`` fixes the token's value (used only for the well-known demo tokens);
    issuing a fixed token that is already stored is a no-op that returns it.
    """
    token = token or new_token()
    async with uow_factory(write=True) as uow:
        user = await uow.users.ensure_user(email, is_staff=is_staff, now=clock())
        now = clock()
        expires_at = None if expires_in is None else now + expires_in
        await uow.users.add_token(user.user_id, hash_token(token), now=now, expires_at=expires_at)
        await uow.commit()
    return token


async def revoke_token(
    uow_factory: UnitOfWorkFactory, token: str, *, clock: Clock = utcnow
) -> bool:
    """Revoke a token at once; False if it was unknown or already revoked."""
    async with uow_factory(write=True) as uow:
        revoked = await uow.users.revoke_token(hash_token(token), now=clock())
        await uow.commit()
    return revoked


async def revoke_tokens_of(
    uow_factory: UnitOfWorkFactory, email: str, *, clock: Clock = utcnow
) -> int:
    """Revoke every live token of a user (a lost laptop); return how many."""
    async with uow_factory(write=True) as uow:
        revoked = await uow.users.revoke_tokens_of(email, now=clock())
        await uow.commit()
    return revoked


async def save_course(
    uow_factory: UnitOfWorkFactory, *, slug: str, title: str, price: Decimal, currency: str
) -> Course:
    """Create a course, or update the course with this slug (an operator's action)."""
    async with uow_factory(write=True) as uow:
        course = await uow.courses.save(slug=slug, title=title, price=price, currency=currency)
        await uow.commit()
    return course


async def list_courses(uow_factory: UnitOfWorkFactory) -> list[Course]:
    async with uow_factory() as uow:
        return await uow.courses.list_all()


async def create_purchase(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    *,
    course: str,
    idempotency_key: str | None = None,
    clock: Clock = utcnow,
) -> Purchase:
    """Create a pending purchase of ``course`` for the actor.

    With an ``idempotency_key``, a repeated call returns the purchase the first call
    created and creates nothing. Raises NotFound for an unknown course and
    IdempotencyKeyReused when the key was used for another course.
    """
    async with uow_factory(write=True) as uow:
        found = await uow.courses.get_by_slug(course)
        if found is None:
            raise NotFound("Course not found", {"course": course})
        if idempotency_key is not None:
            earlier = await uow.purchases.get_by_idempotency_key(actor.user_id, idempotency_key)
            if earlier is not None:
                return _replayed(earlier, course, idempotency_key)
        created = await uow.purchases.add(
            purchase_id=new_purchase_id(),
            owner_id=actor.user_id,
            course=found,
            idempotency_key=idempotency_key,
            now=clock(),
        )
        if created is None:
            # A concurrent call with the same key won the race; answer as it did.
            assert idempotency_key is not None
            earlier = await uow.purchases.get_by_idempotency_key(actor.user_id, idempotency_key)
            assert earlier is not None
            return _replayed(earlier, course, idempotency_key)
        await uow.commit()
        return created


def _replayed(earlier: Purchase, course: str, idempotency_key: str) -> Purchase:
    if earlier.course_slug != course:
        raise IdempotencyKeyReused(idempotency_key, earlier.course_slug)
    return earlier


async def get_purchase(
    uow_factory: UnitOfWorkFactory, actor: Actor, *, purchase_id: str
) -> Purchase:
    """Return one purchase the actor may see; NotFound otherwise (ids cannot be probed)."""
    async with uow_factory() as uow:
        purchase = await uow.purchases.get(purchase_id, owner_id=_visible_owner(actor))
    if purchase is None:
        raise NotFound("Purchase not found", {"purchase_id": purchase_id})
    return purchase


async def list_purchases(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    *,
    state: PurchaseState | None = None,
    limit: int = 20,
    cursor: int | None = None,
) -> PurchasePage:
    """Return a page of purchases newest first, continuing before ``cursor``."""
    async with uow_factory() as uow:
        rows = await uow.purchases.list_page(
            owner_id=_visible_owner(actor), state=state, limit=limit + 1, before=cursor
        )
    items = rows[:limit]
    next_before = items[-1].pk if len(rows) > limit else None
    return PurchasePage(items=items, next_before=next_before)


async def fulfill_purchase(
    uow_factory: UnitOfWorkFactory,
    actor: Actor,
    links: FrontendLinks,
    *,
    purchase_id: str,
    purchase_state: PurchaseState,
    error_msg: str | None = None,
    clock: Clock = utcnow,
) -> Fulfillment:
    """Apply the outcome of a payment to a purchase, following ``states.TRANSITIONS``.

    Fulfilling creates the course registration and the receipt outbox row in the same
    transaction. Repeating a request answers exactly as before and changes nothing.
    ``error_msg`` is recorded only when the purchase becomes ``failed``.
    Raises NotFound (unknown or not visible) and InvalidTransition (409).
    """
    owner = _visible_owner(actor)
    async with uow_factory(write=True) as uow:
        purchase = await uow.purchases.get(purchase_id, owner_id=owner)
        if purchase is None:
            raise NotFound("Purchase not found", {"purchase_id": purchase_id})
        # Each lost race moves the purchase on to another state, so this loop ends.
        for _attempt in range(len(PurchaseState)):
            step = step_for(purchase.state, purchase_state)
            if step is not Step.APPLY:
                break
            now = clock()
            changed = await uow.purchases.transition(
                purchase.pk,
                sources=sources_of(purchase_state),
                target=purchase_state,
                error_msg=error_msg if purchase_state is PurchaseState.FAILED else None,
                now=now,
            )
            # Read back what the database holds now: ours if we won, the winner's if not.
            refreshed = await uow.purchases.get(purchase_id, owner_id=owner)
            assert refreshed is not None
            purchase = refreshed
            if changed:
                if purchase_state is PurchaseState.FULFILLED:
                    await uow.registrations.add(purchase, now=now)
                    await uow.receipts.add(purchase, now=now)
                await uow.commit()
                break
        if step is Step.CONFLICT:
            raise InvalidTransition(purchase.state, purchase_state)
    return Fulfillment(redirect_url=links.after_fulfillment(purchase), purchase=purchase)


async def list_registrations(uow_factory: UnitOfWorkFactory, actor: Actor) -> list[Registration]:
    """Return the actor's own course registrations, newest first."""
    async with uow_factory() as uow:
        return await uow.registrations.list_for_user(actor.user_id)

"""Account deletion (issue 18): a user deletes their own account after re-authenticating.

The users row is anonymised, never removed: ledger rows, transactions, blocks and rewards reference
it, and `chain verify` must still balance every wallet against its ledger (docs/schema.md "Account
deletion" lists what is removed, what is kept and why). In one database transaction:

1. pending transfers *to* the account are rejected (nobody would own what they bring);
2. money still in flight refuses the deletion (`conflict`, field naming it): open purchases or
   escrows not settled, as buyer or seller; active stakes (unstake first: the lock-up is part of the
   stake's terms, so deletion does not break it early); pending outgoing transfers;
3. the remaining KVP balance is burned through the ledger (reason `account_closed`);
4. the blocks the user mined are burned (the seed's use case), their DataPods leave the market,
   their open NFT listings are cancelled, their game sessions end, their games lose their owner;
5. personal rows are deleted and the users row is scrubbed (db/account_deletion.py).

After commit every session of the account ends on every node (`signed_out` with reason
`account_deleted`); the tokens were already refused once the session rows were gone.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import asyncpg
import structlog

from db import account_deletion as queries
from db import ledger, outbox
from db import nfts as nft_queries
from server.core.errors import Conflict, Forbidden, InvalidPayload, Unauthorized
from server.core.identity import Identity
from server.core.money import money
from server.services import chain, marketplace, nfts
from server.services.auth import AuthService

log = structlog.get_logger(__name__)

ACCOUNT_DELETED = "account_deleted"        # `reason` of the `signed_out` event
BURN_REASON = ledger.ACCOUNT_CLOSED_BURN
# A Google-only account has no password to confirm: its session must have signed in this recently.
FRESH_SIGN_IN = dt.timedelta(minutes=5)
REJECTED_TRANSFER = "the receiver's account was deleted"

BLOCKED = {
    "purchases": "you have {n} purchase(s) still being paid, held in escrow, disputed or awaiting settlement; "
                 "confirm receipt or wait until they are settled",
    "sales": "{n} sale(s) of your DataPods are still being paid, held in escrow, disputed or awaiting "
             "settlement; wait until they are settled",
    "stakes": "you have {n} active stake(s); unstake first (POST /api/v1/me/stakes/{{stake_id}}/unstake)",
    "transfers": "you have {n} pending outgoing transfer(s); wait until they are sealed in a block",
}


async def _reauthenticate(conn: asyncpg.Connection, auth: AuthService, identity: Identity,
                          account: queries.Account, password: str | None, ip_address: str | None) -> None:
    """The current password for password accounts; a sign-in within FRESH_SIGN_IN for Google-only ones."""
    if account.password_hash is not None:
        if not password:
            raise InvalidPayload("confirm with your current password", field="password")
        if not await auth.confirm_password(account.id, account.password_hash, password, ip_address=ip_address):
            raise Forbidden("the password is wrong; nothing was deleted", field="password")
        return
    signed_in = await queries.session_login_time(conn, identity.session_id)
    if signed_in is None or dt.datetime.now(dt.timezone.utc) - signed_in > FRESH_SIGN_IN:
        minutes = int(FRESH_SIGN_IN.total_seconds() // 60)
        raise Forbidden(f"sign in with Google again (within the last {minutes} minutes) to delete your account",
                        field="session")


async def _free_username(conn: asyncpg.Connection) -> str:
    """A 'deleted-<16 hex>' name nobody holds: the old username is free again at once."""
    while True:
        candidate = f"deleted-{secrets.token_hex(8)}"
        if not await queries.username_taken(conn, candidate):
            return candidate


async def delete_account(pool: asyncpg.Pool, auth: AuthService, identity: Identity, password: str | None, *,
                         ip_address: str | None) -> dict[str, Any]:
    """Delete the caller's account (re-authenticated, nothing in flight); what was burned and removed."""
    async with pool.acquire() as conn:
        account = await queries.get_account(conn, identity.user_id)
        if account is None or account.account_kind == "deleted":
            raise Unauthorized("the account no longer exists")
        if account.account_kind != "person":
            raise Forbidden("system accounts cannot be deleted", field="account")
        await _reauthenticate(conn, auth, identity, account, password, ip_address)
        if account.is_admin:
            raise Conflict("an administrator's account cannot be deleted; ask another administrator to remove "
                           "your admin role first", field="account")
        async with conn.transaction():
            # Before the users row lock: sealing locks pending transfers, then mining sessions, then
            # balances, so taking them in the same order cannot deadlock with it.
            rejected = (await queries.reject_incoming_transfers(conn, account.wallet_address, REJECTED_TRANSFER)
                        if account.wallet_address else [])
            await queries.stop_mining(conn, account.id)
            account = await queries.get_account(conn, identity.user_id, lock=True)  # type: ignore[assignment]
            blocked = await queries.blockers(conn, account.id, account.wallet_address)
            if blocked:
                first = blocked[0]
                raise Conflict(BLOCKED[first.field].format(n=first.count), field=first.field)
            burned = account.total_balance
            if burned > 0:
                await ledger.apply_balance_changes(conn, [ledger.BalanceChange(
                    account.id, -burned, BURN_REASON, str(account.id))])
            blocks = await chain.burn_blocks_of(conn, account.id)
            pods = await queries.unpublish_datapods(conn, account.id)
            listings = (await queries.cancel_nft_listings(conn, account.wallet_address)
                        if account.wallet_address else [])
            game_sessions = await queries.end_game_sessions(conn, account.id)
            games = await queries.disown_games(conn, account.id)
            session_ids = await queries.delete_sessions(conn, account.id)
            removed = await queries.delete_personal_rows(conn, account.id)
            deleted_at = await queries.anonymise(conn, account.id, await _free_username(conn))
            await _enqueue_events(conn, rejected, pods, listings)
        # The rows are gone, so no token of the account passes a fresh check; this also drops every
        # node's cached check and closes the sockets. The deletion is committed whatever happens here.
        try:
            await auth.end_sessions(conn, session_ids, ACCOUNT_DELETED)
        except Exception:  # noqa: BLE001 - sockets re-check the (deleted) session on their next command
            log.warning("account_deleted_sessions_not_broadcast", user_id=str(account.id), exc_info=True)
    result = {"deleted": True, "user_id": str(account.id), "deleted_at": deleted_at.isoformat(),
              "balance_burned": money(burned), "blocks_burned": blocks["block_ids"],
              "datapods_unpublished": len(pods), "nft_listings_cancelled": len(listings),
              "game_sessions_ended": game_sessions, "games_disowned": games,
              "incoming_transfers_rejected": [tx.hash for tx in rejected], "sessions_ended": len(session_ids)}
    # No personal data: the id is what every kept row still names; the rest are counts.
    log.info(ACCOUNT_DELETED, user_id=str(account.id), balance_burned=money(burned),
             blocks_burned=len(blocks["block_ids"]), datapods_unpublished=len(pods),
             nft_listings_cancelled=len(listings), transfers_rejected=len(rejected),
             sessions_ended=len(session_ids), rows_removed=sum(removed.counts.values()))
    return result


async def _enqueue_events(conn: asyncpg.Connection, rejected: list[queries.RejectedTransfer],
                          pods: list[queries.Pod], listings: list[int]) -> None:
    """The public feeds hear what changed for everyone else, in the deletion's transaction."""
    for tx in rejected:
        await outbox.enqueue(conn, chain.TRANSACTIONS_CHANNEL, chain.TRANSACTION_REJECTED,
                             {"hash": tx.hash, "sender": tx.sender, "reason": REJECTED_TRANSFER})
    for pod in pods:
        await marketplace.enqueue_datapod_event(conn, pod.id, pod.category, marketplace.DATAPOD_UNPUBLISHED,
                                                {"datapod_id": str(pod.id), "category": pod.category})
    for listing_id in listings:
        listing = await nft_queries.get_listing(conn, listing_id)
        if listing is not None:
            await outbox.enqueue(conn, nfts.CHANNEL, nfts.NFT_LISTING_CANCELLED, listing.to_public())


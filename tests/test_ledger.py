"""The balance ledger: a Hypothesis state machine drives random interleavings of every balance-moving
flow against real PostgreSQL and checks the invariants after each step; the raw balance UPDATE is
private to db/ledger.py; migration 0014 books opening balances for older databases."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from db import chain as chain_queries
from db import escrow as escrow_queries
from db import games as game_queries
from db import ledger, migrate
from db import purchases as purchase_queries
from db import users as user_queries
from db.pool import init_connection
from server.adapters.payments import KvpChainVerifier
from server.core import wallets
from server.core.crypto import encrypt_dataset, wrap_key
from server.core.errors import Conflict, Forbidden, RateLimited
from server.core.settings import Settings
from server.services import escrow, games, nfts, purchases
from server.services.chain import (
    SealConfig,
    allocate,
    burn_blocks_of,
    claim_faucet,
    record_transfer,
    seal_block,
    verify_chain,
)
from server.services.purchase_jobs import PurchaseWorker
from tests.conftest import with_database

ROOT = Path(__file__).resolve().parent.parent
USERS = 4
GRANT_POOL_TOKENS = Decimal(300)
MINING_POOL_TOKENS = Decimal(400)
GAMING_POOL_TOKENS = Decimal(120)
GAME_OWNER = USERS - 1
REVENUE_SHARE = Decimal("0.1")
FAUCET_AMOUNT = Decimal(10)
DAY0 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc)
AMOUNTS = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(25), places=8)
USER = st.integers(min_value=0, max_value=USERS - 1)
ESCROW = USERS  # the escrow wallet's index in the model, after the users
POD_PRICE = Decimal("1.5")
STARTING_GRANT = Decimal(4)
MASTER = b"m" * 32


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def make_pod(conn: asyncpg.Connection, seller_id: uuid.UUID) -> uuid.UUID:
    """A published DataPod whose key opens under MASTER (the purchase job wraps it; no blob is read)."""
    pod_id = uuid.uuid4()
    encrypted = encrypt_dataset(b"a,b\n1,2\n", str(pod_id).encode())
    await conn.execute(
        """INSERT INTO datapods (id, seller_id, title, category, price_sui, walrus_blob_id, walrus_storage_size,
               encryption_key_hash, encryption_iv, wrapped_key, file_type, file_size, published)
           VALUES ($1, $2, 'pod', 'test', $3, $7, 1, $4, $5, $6, 'text/csv', 8, true)""",
        pod_id, seller_id, POD_PRICE, encrypted.key_hash, encrypted.iv_hex,
        wrap_key(MASTER, encrypted.key, str(pod_id).encode()), f"blob-{pod_id}")
    return pod_id


class LedgerMachine(RuleBasedStateMachine):
    """A model of every balance next to the database's; each rule runs the real service function."""

    loop: asyncio.AbstractEventLoop
    admin_dsn: str
    template: str

    def __init__(self) -> None:
        super().__init__()
        self.db_name = f"hub_ledger_{uuid.uuid4().hex[:12]}"
        self.run(_admin(self.admin_dsn, f'CREATE DATABASE "{self.db_name}" TEMPLATE "{self.template}"'))
        dsn = with_database(self.admin_dsn, self.db_name)
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(dsn))
        self.run(init_connection(self.conn))

        async def open_pool() -> asyncpg.Pool:  # created inside the loop, which asyncpg's pool binds to
            return await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
        self.pool = self.run(open_pool())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.pool.close())
        self.run(self.conn.close())
        self.run(_admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))

    @initialize()
    def setup(self) -> None:
        async def create():
            users = []
            for i in range(USERS):
                user = await user_queries.create_user(self.conn, username=f"u{i}", email=f"u{i}@example.org",
                                                      password_hash="x")
                wallet = wallets.Wallet.generate()
                await chain_queries.set_wallet(self.conn, user.id, wallet.public_key, wallet.address)
                users.append((user, wallet))
            grants = await chain_queries.create_pool(self.conn, "grants", GRANT_POOL_TOKENS)
            await chain_queries.create_pool(self.conn, "mining", MINING_POOL_TOKENS)
            await chain_queries.create_pool(self.conn, games.GAMING_POOL, GAMING_POOL_TOKENS)
            game = await game_queries.create_game(
                self.conn, name="g", developer_wallet="dev", revenue_share=REVENUE_SHARE,
                owner_id=users[GAME_OWNER][0].id,
                status="active", token_hash="0" * 64, max_reward_per_event=Decimal(100),
                max_reward_per_minute=Decimal(100_000), max_reward_per_session=Decimal(100_000), reward_types=None)
            sessions = [(await game_queries.start_session(self.conn, game.game_id, user.id, wallet.address)).session_id
                        for user, wallet in users]
            nft_ids = [(await nfts.mint(self.conn, user.id, {"metadata": {"name": f"n{i}"}})).id
                       for i, (user, _) in enumerate(users)]
            return users, grants.id, game.game_id, sessions, nft_ids
        users, self.grant_pool, self.game_id, self.sessions, nft_ids = self.run(create())
        self.accounts = self.run(escrow.load_accounts(self.pool, MASTER))
        self.pods = [self.run(make_pod(self.conn, user.id)) for user, _ in users]   # one per seller
        self.worker = PurchaseWorker(
            self.pool, KvpChainVerifier(self.pool, escrow_address=self.accounts.escrow.address), MASTER,
            Settings(database_url="-", payment_verify_timeout=3600), escrow_accounts=self.accounts)
        self.ids = [user.id for user, _ in users] + [self.accounts.escrow.user_id]
        self.wallets = [wallet for _, wallet in users]
        self.balance = [Decimal(0)] * (USERS + 1)
        self.purchases: dict[uuid.UUID, tuple[int, int]] = {}   # purchase id -> (buyer, seller), still open
        self.bought: set[tuple[int, int]] = set()                # (buyer, seller) released: bought for good
        self.pending: list[tuple[int, int, Decimal]] = []     # submitted, not sealed: (sender, receiver, amount)
        self.nonce = [0] * USERS
        self.claimed: set[tuple[int, int]] = set()
        self.grant_left = GRANT_POOL_TOKENS
        self.mining_left = MINING_POOL_TOKENS
        self.gaming_left = GAMING_POOL_TOKENS
        self.minted = Decimal(0)
        for user in range(USERS):  # enough to buy a DataPod or two from the first step on
            self.run(allocate(self.conn, self.grant_pool, self.ids[user], STARTING_GRANT))
            self.grant_left -= STARTING_GRANT
            self.balance[user] += STARTING_GRANT
            self.minted += STARTING_GRANT
        self.seq = [0] * USERS
        self.nft_owner = {nft_id: i for i, nft_id in enumerate(nft_ids)}
        self.listings: dict[int, tuple[int, Decimal]] = {}    # listing id -> (nft id, price)

    def available(self, user: int) -> Decimal:
        return self.balance[user] - sum(amount for sender, _, amount in self.pending if sender == user)

    # --- rules ---------------------------------------------------------------------------------

    @rule(sender=USER, receiver=USER, amount=AMOUNTS)
    def submit_transfer(self, sender: int, receiver: int, amount: Decimal) -> None:
        if sender == receiver:
            receiver = (receiver + 1) % USERS
        payload = self.wallets[sender].sign_transfer(self.wallets[receiver].address, amount, self.nonce[sender])
        if amount > self.available(sender):
            with pytest.raises(Conflict):
                self.run(record_transfer(self.conn, self.ids[sender], payload))
            return
        self.run(record_transfer(self.conn, self.ids[sender], payload))
        self.nonce[sender] += 1
        self.pending.append((sender, receiver, amount))

    @rule(miner=st.one_of(st.none(), USER))
    def seal(self, miner: int | None) -> None:
        config = SealConfig(difficulty=1, miner_username=f"u{miner}" if miner is not None else None)
        sealed = self.run(seal_block(self.conn, config))
        assert sealed.rejected == [], "a reserved transfer was refused at sealing"
        assert len(sealed.confirmed) == len(self.pending)
        for sender, receiver, amount in self.pending:
            self.balance[sender] -= amount
            self.balance[receiver] += amount
        self.pending = []
        if miner is None:
            assert sealed.reward == 0
        else:
            assert 0 <= sealed.reward <= self.mining_left
            self.mining_left -= sealed.reward
            self.balance[miner] += sealed.reward
            self.minted += sealed.reward
        # The worker's sweep runs every second: payouts sealed by this block become settled.
        self.settle_escrows()

    @rule(user=USER, day=st.integers(min_value=0, max_value=2))
    def faucet(self, user: int, day: int) -> None:
        now = DAY0 + dt.timedelta(days=day)
        if (user, day) in self.claimed:
            with pytest.raises(RateLimited):
                self.run(claim_faucet(self.conn, self.ids[user], FAUCET_AMOUNT, now))
            return
        self.run(claim_faucet(self.conn, self.ids[user], FAUCET_AMOUNT, now))
        self.claimed.add((user, day))
        self.balance[user] += FAUCET_AMOUNT
        self.minted += FAUCET_AMOUNT

    @rule(user=USER, amount=AMOUNTS)
    def pool_grant(self, user: int, amount: Decimal) -> None:
        if amount > self.grant_left:
            with pytest.raises(Conflict):
                self.run(allocate(self.conn, self.grant_pool, self.ids[user], amount))
            return
        self.run(allocate(self.conn, self.grant_pool, self.ids[user], amount))
        self.grant_left -= amount
        self.balance[user] += amount
        self.minted += amount

    @rule(rewards=st.lists(st.tuples(USER, st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(20),
                                                       places=8)), min_size=1, max_size=5))
    def game_rewards(self, rewards: list[tuple[int, Decimal]]) -> None:
        batch = []
        for user, value in rewards:
            batch.append(games.RewardReport(game_id=self.game_id, session_id=self.sessions[user], seq=self.seq[user],
                                            reward_type="coin", value=value))
            self.seq[user] += 1
        results, new = self.run(games.book_rewards(self.conn, batch))
        # In order, each reward and the owner's share (truncated) is paid if the gaming pool covers it.
        accepted = 0
        for (user, value), result in zip(rewards, results):
            share = games.owner_share(value, REVENUE_SHARE)
            if value + share > self.gaming_left:
                assert isinstance(result, Conflict) and result.extra["reason"] == games.POOL_EXHAUSTED, result
                continue
            assert not isinstance(result, Exception), result
            accepted += 1
            self.gaming_left -= value + share
            self.balance[user] += value
            self.balance[GAME_OWNER] += share
            self.minted += value + share
        assert new == accepted, results

    @rule(data=st.data(), price=st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(40), places=8))
    def list_nft(self, data: st.DataObject, price: Decimal) -> None:
        listed = {nft_id for nft_id, _ in self.listings.values()}
        unlisted = sorted(set(self.nft_owner) - listed)
        if not unlisted:
            return
        nft_id = data.draw(st.sampled_from(unlisted))
        owner = self.nft_owner[nft_id]
        listing = self.run(nfts.create_listing(self.conn, self.ids[owner], nft_id, str(price)))
        self.listings[listing.id] = (nft_id, price)

    @precondition(lambda self: self.listings)
    @rule(data=st.data(), buyer=USER)
    def buy_nft(self, data: st.DataObject, buyer: int) -> None:
        listing_id = data.draw(st.sampled_from(sorted(self.listings)))
        nft_id, price = self.listings[listing_id]
        seller = self.nft_owner[nft_id]
        if buyer == seller:
            with pytest.raises(Forbidden):
                self.run(nfts.buy(self.conn, self.ids[buyer], listing_id))
            return
        if price > self.available(buyer):
            with pytest.raises(Conflict):
                self.run(nfts.buy(self.conn, self.ids[buyer], listing_id))
            return
        self.run(nfts.buy(self.conn, self.ids[buyer], listing_id))
        del self.listings[listing_id]
        self.nft_owner[nft_id] = buyer
        self.balance[buyer] -= price
        self.balance[seller] += price

    @rule(buyer=USER, seller=USER)
    def buy_datapod(self, buyer: int, seller: int) -> None:
        """Pay the escrow (a signed transfer, sealed later) and start the purchase, as the page does."""
        if (buyer == seller or POD_PRICE > self.available(buyer) or (buyer, seller) in self.purchases.values()
                or (buyer, seller) in self.bought):
            return
        if self.run(escrow_queries.refund_unsettled(self.conn, self.ids[buyer], self.pods[seller])):
            return  # the page would show "still being paid back" before paying (start_purchase refuses)
        payload = self.wallets[buyer].sign_transfer(self.accounts.escrow.address, POD_PRICE, self.nonce[buyer])
        tx = self.run(record_transfer(self.conn, self.ids[buyer], payload))
        self.nonce[buyer] += 1
        self.pending.append((buyer, ESCROW, POD_PRICE))

        async def start() -> uuid.UUID:
            async with self.conn.transaction():
                pod = await purchase_queries.get_pod(self.conn, self.pods[seller])
                purchase_id = await purchase_queries.create_purchase(self.conn, self.ids[buyer], pod, tx.hash)
                await purchase_queries.enqueue_job(self.conn, purchase_id)
                return purchase_id
        self.purchases[self.run(start())] = (buyer, seller)

    @rule()
    def purchase_worker(self) -> None:
        """The worker's round: every job as far as it goes now (a purchase whose payment is sealed
        completes, in escrow), then the payout sweep (newly signed payouts are pending transfers)."""
        self.run(self.conn.execute("UPDATE purchase_jobs SET run_after = now()"))
        while self.run(self.worker.run_once()):
            pass
        self.settle_escrows()

    @precondition(lambda self: self.purchases)
    @rule(data=st.data(), refund=st.booleans())
    def decide_escrow(self, data: st.DataObject, refund: bool) -> None:
        """The buyer confirms or an admin refunds; only a holding escrow moves, and only once."""
        held_rows = self.run(self.conn.fetch("SELECT purchase_id FROM escrow_transactions WHERE status = 'holding'"))
        holding = [row["purchase_id"] for row in held_rows if row["purchase_id"] in self.purchases]
        # Mostly an escrow that can move; sometimes any purchase, which must then be refused.
        prefer_holding = data.draw(st.booleans())   # drawn every time: the draws must not depend on the data
        choices = holding if holding and prefer_holding else list(self.purchases)
        purchase_id = data.draw(st.sampled_from(sorted(choices)))

        async def decide():
            async with self.conn.transaction():
                if refund:
                    return await purchases.refund_purchase(self.conn, purchase_id, "test")
                return await purchases.release_escrow(self.conn, purchase_id, "test", Decimal(0))
        held = self.run(escrow_queries.get(self.conn, purchase_id))
        completed = self.run(self.conn.fetchval("SELECT status FROM purchases WHERE id = $1", purchase_id))
        decided = self.run(decide())
        assert (decided is not None) == (held is not None and held.status == "holding"
                                          and (refund or completed == "completed"))
        if decided is not None:
            if not refund:
                self.bought.add(self.purchases[purchase_id])
            del self.purchases[purchase_id]

    def settle_escrows(self) -> None:
        """The payout sweep: each newly signed payout is a pending transfer from the escrow wallet."""
        before = set(self.run(self.conn.fetch("SELECT transaction_hash FROM transactions WHERE sender = $1",
                                              self.accounts.escrow.address)))
        self.run(self.worker.settle_escrows())
        for row in self.run(self.conn.fetch(
                "SELECT transaction_hash, receiver_id, amount FROM transactions WHERE sender = $1",
                self.accounts.escrow.address)):
            if (row["transaction_hash"],) not in {tuple(r) for r in before}:
                self.pending.append((ESCROW, self.ids.index(row["receiver_id"]), row["amount"]))

    @rule(miner=USER)
    def burn_blocks(self, miner: int) -> None:
        # Burning a miner's blocks marks them; it moves no balance.
        self.run(burn_blocks_of(self.conn, self.ids[miner]))

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def balances_match_the_model_and_the_ledger(self) -> None:
        if not hasattr(self, "ids"):
            return
        rows = self.run(self.conn.fetch(
            """SELECT u.id, u.total_balance,
                      (SELECT coalesce(sum(delta), 0) FROM balance_ledger l WHERE l.user_id = u.id) AS ledger
                 FROM users u"""))
        stored = {row["id"]: (row["total_balance"], row["ledger"]) for row in rows}
        for i, user_id in enumerate(self.ids):
            balance, booked = stored[user_id]
            assert balance >= 0
            assert balance == booked == self.balance[i], (i, balance, booked, self.balance[i])
        # Money is conserved: only faucet claims, pool grants, mining and game rewards create it.
        assert sum(balance for balance, _ in stored.values()) == self.minted

    @invariant()
    def chain_verifies(self) -> None:
        report = self.run(verify_chain(self.conn))
        assert report.ok, report.problems


# A fixed amount of work (20 examples of 40 steps, about a minute alone) that takes longer beside
# the other workers of `make test -n`: the budget is for a loaded machine, not a slow test.
@pytest.mark.timeout(400)
def test_random_interleavings_keep_the_ledger_whole(pg_admin_dsn, template_db):
    loop = asyncio.new_event_loop()
    LedgerMachine.loop, LedgerMachine.admin_dsn, LedgerMachine.template = loop, pg_admin_dsn, template_db
    try:
        run_state_machine_as_test(LedgerMachine, settings=settings(
            max_examples=20, stateful_step_count=40, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        loop.close()


class _Drawn:
    """Stands for hypothesis's st.data() in a scripted run: hands out the given values in order."""

    def __init__(self, *values: object) -> None:
        self.values = list(values)

    def draw(self, strategy: object) -> object:
        return self.values.pop(0)


def test_a_refunded_purchase_bought_again_keeps_its_escrow_whole(pg_admin_dsn, template_db):
    """The sequence hypothesis found: the purchase restarts with a new payment while its escrow is
    still the refunded one, which must keep counting its own payment, not the new one."""
    loop = asyncio.new_event_loop()
    LedgerMachine.loop, LedgerMachine.admin_dsn, LedgerMachine.template = loop, pg_admin_dsn, template_db
    machine = LedgerMachine()
    try:
        machine.setup()
        machine.buy_datapod(buyer=2, seller=1)
        [purchase_id] = machine.purchases
        machine.seal(miner=None)
        machine.purchase_worker()
        machine.decide_escrow(data=_Drawn(True, purchase_id), refund=True)
        machine.purchase_worker()
        machine.seal(miner=None)
        machine.buy_datapod(buyer=2, seller=1)
        assert list(machine.purchases) == [purchase_id]  # the same row, restarted
        machine.chain_verifies()
        machine.balances_match_the_model_and_the_ledger()
        machine.seal(miner=None)
        machine.purchase_worker()
        machine.decide_escrow(data=_Drawn(True, purchase_id), refund=False)
        machine.purchase_worker()
        machine.seal(miner=None)
        machine.chain_verifies()
        machine.balances_match_the_model_and_the_ledger()
    finally:
        machine.teardown()
        loop.close()


def test_only_the_ledger_moves_balances():
    """No module but db/ledger.py writes users.total_balance, so no flow can skip its ledger row."""
    writers = [path.relative_to(ROOT).as_posix() for folder in ("db", "server", "handlers")
               for path in (ROOT / folder).rglob("*.py")
               if re.search(r"SET\s+total_balance", path.read_text(), re.IGNORECASE)]
    assert writers == ["db/ledger.py"]


async def test_migration_0014_books_opening_balances(db, db_dsn):
    """A database from before the ledger covered every flow: its balances get opening rows, once."""
    users = [await user_queries.create_user(db, username=f"m{i}", email=f"m{i}@example.org", password_hash="x")
             for i in range(3)]
    async with db.transaction():
        await ledger.apply_balance_changes(db, [ledger.BalanceChange(users[0].id, Decimal(5), ledger.GAME_REWARD, "1")])
    # Moves made off the ledger by the older code: a grant, and a transfer out of a booked reward.
    await db.execute("UPDATE users SET total_balance = total_balance + 100 WHERE id = $1", users[1].id)
    await db.execute("UPDATE users SET total_balance = total_balance - 2 WHERE id = $1", users[0].id)
    problems = (await verify_chain(db)).ledger_problems
    assert len(problems) == 2 and all(any(str(u.id) in p for p in problems) for u in users[:2]), problems
    await asyncio.to_thread(migrate.downgrade, db_dsn, "0013")
    await asyncio.to_thread(migrate.upgrade, db_dsn)
    rows = await db.fetch("SELECT user_id, delta, balance_after, reference FROM balance_ledger WHERE reason = $1",
                          ledger.OPENING_BALANCE)
    assert {(r["user_id"], r["delta"], r["balance_after"], r["reference"]) for r in rows} == {
        (users[0].id, -2, 3, f"migration-0014:{users[0].id}"),
        (users[1].id, 100, 100, f"migration-0014:{users[1].id}")}
    report = await verify_chain(db)
    assert report.ok, report.problems
    # The history chains from the opening row on.
    async with db.transaction():
        await ledger.apply_balance_changes(db, [
            ledger.BalanceChange(users[1].id, Decimal(-40), ledger.NFT_PURCHASE, "7"),
            ledger.BalanceChange(users[2].id, Decimal(40), ledger.NFT_SALE, "7")])
    assert (await verify_chain(db)).ok
    await asyncio.to_thread(migrate.downgrade, db_dsn, "0013")
    assert await db.fetchval("SELECT count(*) FROM balance_ledger WHERE reason = $1", ledger.OPENING_BALANCE) == 0


async def test_a_draw_the_pool_cannot_cover_moves_nothing_and_one_it_can_moves_all(db):
    alice, bob = [await user_queries.create_user(db, username=name, email=f"{name}@example.org", password_hash="x")
                  for name in ("alice", "bob")]
    pool_id = await db.fetchval("INSERT INTO reward_pools (pool_name, total_tokens) VALUES ('gaming', 10) "
                                "RETURNING pool_id")
    changes = [ledger.BalanceChange(alice.id, Decimal(6), ledger.GAME_REWARD, "1"),
               ledger.BalanceChange(bob.id, Decimal("0.6"), ledger.REVENUE_SHARE, "1")]

    async def state() -> tuple:
        return (await db.fetchval("SELECT allocated_tokens FROM reward_pools WHERE pool_id = $1", pool_id),
                await db.fetchval("SELECT sum(total_balance) FROM users"),
                await db.fetchval("SELECT count(*) FROM balance_ledger"))

    async with db.transaction():
        with pytest.raises(ledger.PoolShort):
            await ledger.apply_balance_changes(db, changes, draw=ledger.PoolDraw(pool_id, Decimal("10.01")))
        assert await state() == (0, 0, 0)  # the same transaction sees nothing moved
        after = await ledger.apply_balance_changes(db, changes, draw=ledger.PoolDraw(pool_id, Decimal("6.6")))
    assert after == {alice.id: Decimal(6), bob.id: Decimal("0.6")}
    assert await state() == (Decimal("6.6"), Decimal("6.6"), 2)

"""The retrieval-only assistant's intent router: questions answered by documented rules, no model.

`INTENTS` is an ordered table of `Intent(name, matcher, handler)`. The router tries them in order
over the lowercased question: the first whose matcher returns something truthy and whose handler
returns markdown answers (a handler returning None lets the next intent try). The last entry,
full-text search, always matches, and says what the assistant can do when nothing is found.
Adding an intent is adding one entry (before `search`). docs/assistant.md lists the rules.

Every intent that reads data does it through `Ask.call`, which the assistant announces as a tool
call (`tool_called` / `tool_returned` with the DataPod ids), so clients show cards. DataPods are
written `**Title** [datapod:<id>]`; prices are Decimals shown without trailing zeros.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import uuid
from decimal import Decimal
from typing import Any, Awaitable, Callable

import asyncpg
from aiohttp import web

from db import assistant as assistant_queries
from db import assistant_intents as queries
from db.assistant_intents import PodFacts
from server.core.money import plain_decimal
from server.services import dataset_query

Run = Callable[[asyncpg.Connection], Awaitable[Any]]
ToolRunner = Callable[[str, dict[str, Any], Run], Awaitable[Any]]

MAX_LIST = 10  # DataPods one answer lists at most
DEFAULT_LIST = 5  # a plural question without a number
MAX_COMPARE = 5


class ToolFailed(Exception):
    """A data read of an intent failed (it was announced as a failed tool call)."""


@dataclasses.dataclass
class Ask:
    """One question to answer and what answering it may use."""

    text: str
    user_id: uuid.UUID
    tool: ToolRunner  # announces a read as a tool call, runs it on a connection, returns its result
    previous_ids: list[uuid.UUID] = dataclasses.field(default_factory=list)  # the previous answer's DataPods
    app: web.Application | None = None
    read: Callable[[Run], Awaitable[Any]] | None = None  # an unannounced lookup that helps read the question
    lower: str = ""

    def __post_init__(self) -> None:
        text = self.text[:2000].lower().translate(str.maketrans("’‘“”", "''\"\""))
        self.lower = " ".join(text.split())

    async def call(self, name: str, arguments: dict[str, Any], run: Run) -> Any:
        """A read announced as the tool call `name(arguments)`; ToolFailed when it fails."""
        return await self.tool(name, arguments, run)


@dataclasses.dataclass(frozen=True)
class Intent:
    """One rule: `matcher(ask)` is truthy when it applies; `handler(ask, matched)` answers (None: pass)."""

    name: str
    matcher: Callable[[Ask], Any]
    handler: Callable[[Ask, Any], Awaitable[str | None]]


def public(value: Any) -> Any:
    """A tool result as JSON: dataclasses by their `to_public`, lists and dicts walked."""
    if hasattr(value, "to_public"):
        return value.to_public()
    if isinstance(value, list):
        return [public(v) for v in value]
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, Decimal):
        return plain_decimal(value)
    return value


# --- words and numbers ------------------------------------------------------------------------------

NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a pair of": 2, "a few": 3}
NUM = r"(?:\d+(?:\.\d+)?(?!\.?\d)|(?:" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")\b)"
UUID_RE = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
# A number followed by one of these counts something else than SUI.
_NOT_PRICE = r"(?!\s*(?:rows?|columns?|fields?|kb|mb|gb|bytes?|sales?|stars?|%|days?|weeks?|months?))"
_NOT_COUNT = re.compile(r"\s*(?:sui|rows?|columns?|fields?|kb|mb|gb|bytes?|sales?|stars?|%|days?|weeks?)\b")
SINGULAR = re.compile(r"\b(?:datapod|dataset|pod|one|which|what(?:'s| is)|the (?:most|least|\w+est))\b")
CHOSEN_FROM = re.compile(r"\b(?:of|among) (?:them|these|those|all)\b")  # "the cheapest of them": one of a set
PLURAL = re.compile(r"\b(?:datapods|datasets|pods|ones|options|listings|products|them|they|these|those|all)\b")
REFERENCE = re.compile(r"\b(?:which one|which ones|which of|them|they|these|those|of the above|each|both|it|its)\b")
FILLER = {"the", "a", "an", "of", "datapod", "datapods", "dataset", "datasets", "data", "pod", "pods", "one",
          "ones", "please", "me", "show", "and", "my", "with", "for", "in", "on", "is", "are", "does", "do",
          "did", "have", "has", "how", "many", "much", "rows", "row", "big", "large", "size", "what", "what's",
          "whats", "which", "there", "contain", "contains", "hold", "holds", "count", "number", "file",
          "compare", "between", "difference", "differences", "to", "vs", "versus", "tell", "about"}


def number(text: str) -> Decimal:
    """A number written in digits or words ("3", "1.5", "three")."""
    return Decimal(NUMBER_WORDS[text]) if text in NUMBER_WORDS else Decimal(text)


def _blank(text: str, match: re.Match) -> str:
    """The text with a match replaced by spaces (positions of later matches stay valid)."""
    return text[:match.start()] + " " * (match.end() - match.start()) + text[match.end():]


def title_words(text: str) -> list[str]:
    """The significant words of a DataPod's name as a question writes it."""
    return [w for w in re.findall(r"[a-z0-9]+", text) if w not in FILLER]


# --- filters: price, category, column ---------------------------------------------------------------

@dataclasses.dataclass
class Filters:
    """What narrows a list of DataPods; `describe` says it in words."""

    category: str | None = None
    min_price: Decimal | None = None
    min_inclusive: bool = True
    max_price: Decimal | None = None
    max_inclusive: bool = True
    column: str | None = None
    ids: list[uuid.UUID] | None = None  # the previous answer's DataPods (a follow-up)

    def arguments(self) -> dict[str, Any]:
        """The filters as tool-call arguments."""
        args: dict[str, Any] = {}
        if self.category:
            args["category"] = self.category
        if self.min_price is not None:
            args["min_price"] = plain_decimal(self.min_price)
            args["min_inclusive"] = self.min_inclusive
        if self.max_price is not None:
            args["max_price"] = plain_decimal(self.max_price)
            args["max_inclusive"] = self.max_inclusive
        if self.column:
            args["column"] = self.column
        if self.ids is not None:
            args["datapod_ids"] = [str(i) for i in self.ids]
        return args

    def describe(self) -> str:
        """" in climate, priced under 2 SUI, with a `yield` column" (empty without filters)."""
        parts = []
        if self.category:
            parts.append(f"in {self.category}")
        low, high = self.min_price, self.max_price
        if low is not None and high is not None:
            parts.append(f"priced between {sui(low)} and {sui(high)}")
        elif high is not None and high == 0:
            parts.append("that is free")
        elif high is not None:
            parts.append(f"priced {'at most' if self.max_inclusive else 'under'} {sui(high)}")
        elif low is not None:
            parts.append(f"priced {'at least' if self.min_inclusive else 'over'} {sui(low)}")
        if self.column:
            parts.append(f"with a `{self.column}` column")
        if self.ids is not None:
            parts.append("among the DataPods of my previous answer")
        return (" " + ", ".join(parts)) if parts else ""

    @property
    def any(self) -> bool:
        """Whether a price, category or column narrows the list."""
        return bool(self.category or self.min_price is not None or self.max_price is not None or self.column)


_BETWEEN = re.compile(rf"\b(?:between|from)\s+({NUM})\s*(?:sui\s+)?(?:and|to|-)\s+({NUM})\s*(?:sui\b)?{_NOT_PRICE}")
_MAX = re.compile(rf"(?<!\w)(no more than|not more than|under|below|less than|cheaper than|up to|at most|"
                  rf"max(?:imum)?|<=|<)\s*({NUM})\s*(?:sui\b)?{_NOT_PRICE}")
_MIN = re.compile(rf"(?<!\w)(over|above|more than|more expensive than|pricier than|at least|min(?:imum)?|"
                  rf">=|>)\s*({NUM})\s*(?:sui\b)?{_NOT_PRICE}")
_FREE = re.compile(r"\bfree\b")
_INCLUSIVE = {"no more than", "not more than", "up to", "at most", "max", "maximum", "<=",
              "at least", "min", "minimum", ">="}


def price_filter(text: str, filters: Filters) -> str:
    """Read the price range of a question into `filters`; returns the text with it blanked out."""
    if match := _BETWEEN.search(text):
        low, high = sorted((number(match.group(1)), number(match.group(2))))
        filters.min_price, filters.max_price = low, high
        return _blank(text, match)
    if match := _MAX.search(text):
        filters.max_price, filters.max_inclusive = number(match.group(2)), match.group(1) in _INCLUSIVE
        text = _blank(text, match)
    if match := _MIN.search(text):
        filters.min_price, filters.min_inclusive = number(match.group(2)), match.group(1) in _INCLUSIVE
        text = _blank(text, match)
    if filters.max_price is None and filters.min_price is None and (match := _FREE.search(text)):
        filters.max_price = Decimal(0)
        text = _blank(text, match)
    return text


_COLUMN_FORMS = (
    re.compile(r"\b(?:with|having|has|have|contain(?:s|ing)?|includ(?:es?|ing))\s+(?:an?\s+|the\s+)?"
               r"(?:columns?|fields?)\s+(?:named\s+|called\s+)?[\"'`]?([a-z0-9_.]+)"),
    re.compile(r"\b(?:with|having|has|have|contain(?:s|ing)?|includ(?:es?|ing))\s+(?:an?\s+|the\s+)?"
               r"[\"'`]?([a-z0-9_.]+)[\"'`]?\s+(?:columns?|fields?)\b"),
)


def column_filter(text: str, filters: Filters) -> str:
    """Read "with a <name> column" into `filters`; returns the text with it blanked out."""
    for form in _COLUMN_FORMS:
        if (match := form.search(text)) and match.group(1) not in ("a", "an", "the"):
            filters.column = match.group(1)
            return _blank(text, match)
    return text


async def category_filter(ask: Ask, text: str, filters: Filters) -> str:
    """A published category named in the question (the longest) into `filters`; the rest of the text."""
    found = None
    names = await (ask.read(queries.category_names) if ask.read else ask.call("list_categories", {},
                                                                              queries.category_names))
    for name in names:
        match = re.search(rf"\b{re.escape(name.lower())}\b", text)
        if match and (found is None or len(name) > len(found[0])):
            found = name, match
    if found is None:
        return text
    filters.category = found[0]
    return _blank(text, found[1])


# --- formatting -------------------------------------------------------------------------------------

def sui(value: Decimal | str | None) -> str:
    """A price: "1.5 SUI", never "1.500000000"."""
    return "—" if value is None else f"{plain_decimal(Decimal(value))} SUI"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell or bold span."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def link(title: str, datapod_id: Any) -> str:
    """A DataPod reference as answers write it: the title in bold, then its id as `[datapod:<id>]`."""
    return f"**{cell(title)}** [datapod:{datapod_id}]"


def rating(value: Decimal | None) -> str:
    """An average rating to one decimal with a star, or "not rated"."""
    return f"{plain_decimal(Decimal(value).quantize(Decimal('0.1')))}★" if value else "not rated"


def size(n: int | None) -> str:
    """Bytes in human units (1024-based)."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def rows(n: int | None) -> str:
    """A row count with thousands separators ("—" when unknown)."""
    return "—" if n is None else f"{n:,}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 sale", "2 sales" ("2 categories" with `many`)."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def pod_table(pods: list[PodFacts], *, added: bool = False) -> str:
    """DataPods as a numbered markdown table."""
    head = "| # | DataPod | Category | Price | Rating | Sales | Rows | Size |" + (" Added |" if added else "")
    lines = [head, "|---" * (8 + added) + "|"]
    for n, pod in enumerate(pods, 1):
        line = (f"| {n} | {link(pod.title, pod.id)} | {cell(pod.category or 'uncategorised')} | {sui(pod.price_sui)} "
                f"| {rating(pod.average_rating)} | {pod.purchase_count} | {rows(pod.row_count)} "
                f"| {size(pod.file_size)} |")
        lines.append(line + (f" {pod.created_at.date().isoformat()} |" if added else ""))
    return "\n".join(lines)


HELP = """Here is what I can answer without an AI model (ask in your own words):

- **Rankings**: “the 3 cheapest DataPods”, “most expensive”, “top rated”, “best selling”, “newest”, \
“which one has the most rows?”, “the largest dataset”
- **Comparisons**: “compare the two cheapest”, “compare Daily city weather and Stock ticks”
- **Categories**: “which categories are there?”
- **Prices**: “DataPods under 2 SUI”, “between 1 and 3 SUI”, “over 5 SUI”, “free DataPods”
- **Columns**: “DataPods with a yield column”
- **Size**: “how many rows does Daily city weather have?”
- **Yours**: “what did I buy?”, and for sellers “my sales this week”
- **Inside a dataset you bought or sell**: “stats of Daily city weather”, “top values of city in \
Daily city weather”, “rows matching rain in Daily city weather”
- **Search**: any other words are searched in titles and descriptions

A follow-up such as “which one has the most rows?” or “compare them” refers to the DataPods of my \
previous answer."""


# --- intents ----------------------------------------------------------------------------------------

_GREETING = re.compile(r"^(?:hi|hello|hey|hiya|howdy|yo|greetings|hallo|hola|bonjour|good (?:morning|afternoon|"
                       r"evening|day)|thanks|thank you|thx)"
                       r"(?: there| assistant| everyone| all| again| a lot| so much)?$")
_HELP = re.compile(r"^(?:please )?(?:help|help me|\?)(?: please)?$|\bwhat (?:can|could) you do\b|"
                   r"\bwhat (?:can|should|could|do) i ask\b|\bhow do(?:es)? (?:you|this|it) work\b|\bwho are you\b|"
                   r"\bwhat are you\b|\bwhat do you know\b|\bwhat are your (?:skills|capabilities)\b")


def _bare(ask: Ask) -> str:
    return re.sub(r"[^\w' ]+", " ", ask.lower).strip()


def match_greeting(ask: Ask) -> str | None:
    """"hello" or "thanks" when the whole message is one, "help" for a question about the assistant."""
    bare = " ".join(_bare(ask).split())
    if _GREETING.match(bare):
        return "thanks" if bare.startswith("than") or bare.startswith("thx") else "hello"
    return "help" if _HELP.search(bare) or _HELP.search(ask.lower) else None


async def answer_greeting(ask: Ask, kind: str) -> str:
    """Greeting, thanks or help: what the assistant can do, with example questions."""
    if kind == "thanks":
        return "You're welcome! Ask me anything else about the marketplace.\n\n" + HELP
    opening = "Hello! I'm the SourceNet marketplace assistant. " if kind == "hello" else ""
    return opening + HELP


_PURCHASES = re.compile(r"\bwhat (?:did|have) i (?:buy|bought|purchased?|get)\b|\bmy purchases?\b|"
                        r"\bi(?:'ve| have)? (?:bought|purchased)\b|\bmy orders?\b|\bpurchase history\b|"
                        r"\bwhat do i own\b|\bmy (?:bought|purchased) (?:datapods|datasets)\b")


async def answer_purchases(ask: Ask, _: Any) -> str:
    """The asker's own purchases, newest first."""
    bought = await ask.call("my_purchases", {}, lambda conn: assistant_queries.my_purchases(conn, ask.user_id))
    if not bought:
        return "You have not bought any DataPod yet. Ask for “the cheapest DataPods” or “top rated” to find one."
    lines = [f"You have {plural(len(bought), 'purchase')}:", "", "| DataPod | Paid | Status | Date |",
             "|---|---|---|---|"]
    for p in bought:
        lines.append(f"| {link(p['title'], p['datapod_id'])} | {sui(p['amount_sui'])} | {p['status']} "
                     f"| {p['purchased_at'][:10]} |")
    return "\n".join(lines)


_SALES = re.compile(r"\bmy sales\b|\bwhat (?:did|have) i sold\b|\bwhat did i sell\b|\bi(?:'ve| have)? sold\b|"
                    r"\bmy (?:revenue|earnings|income)\b|\bhow much (?:did|have) i (?:earn|earned|make|made)\b|"
                    r"\bwho bought my\b|\bsales of my\b|\bmy (?:datapods'?|datasets'?) sales\b")


def sales_period(text: str, now: dt.datetime) -> tuple[dt.datetime | None, str]:
    """Since when "my sales ..." counts (UTC), and the period in words; all time by default."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if re.search(r"\btoday\b", text):
        return midnight, "today"
    if re.search(r"\bthis week\b", text):
        return midnight - dt.timedelta(days=midnight.weekday()), "this week (since Monday, UTC)"
    if re.search(r"\bthis month\b", text):
        return midnight.replace(day=1), "this month"
    if re.search(r"\bthis year\b", text):
        return midnight.replace(month=1, day=1), "this year"
    if match := re.search(rf"\b(?:last|past)\s+({NUM})\s+days?\b", text):
        days = int(number(match.group(1)))
        return now - dt.timedelta(days=days), f"in the last {plural(days, 'day')}"
    if re.search(r"\b(?:last|past) week\b", text):
        return now - dt.timedelta(days=7), "in the last 7 days"
    if re.search(r"\b(?:last|past) month\b", text):
        return now - dt.timedelta(days=30), "in the last 30 days"
    return None, "so far"


async def answer_sales(ask: Ask, _: Any) -> str:
    """The asker's own completed sales over the period the question names, per DataPod."""
    since, period = sales_period(ask.lower, dt.datetime.now(dt.timezone.utc))
    lines_ = await ask.call("my_sales", {"since": since.isoformat() if since else None},
                            lambda conn: queries.seller_sales(conn, ask.user_id, since))
    if not lines_:
        return f"You have no completed sales {period}."
    total = sum(line.sales for line in lines_)
    revenue = sum((line.revenue_sui for line in lines_), Decimal(0))
    out = [f"Your sales {period}: **{plural(total, 'sale')}, {sui(revenue)}** paid by buyers.", "",
           "| DataPod | Sales | Paid | Last sale |", "|---|---|---|---|"]
    for line in lines_:
        out.append(f"| {link(line.title, line.datapod_id)} | {line.sales} | {sui(line.revenue_sui)} "
                   f"| {line.last_sale_at.date().isoformat()} |")
    return "\n".join(out)


# Rankings: (pattern, sort key, descending, how the heading says it). The first listed that matches wins.
RANKINGS = (
    (r"\b(?:most|highest number of|largest number of|biggest number of|more) rows\b", "rows", True,
     "with the most rows"),
    (r"\b(?:fewest|least|smallest number of|lowest number of|fewer) rows\b", "rows", False, "with the fewest rows"),
    (r"\b(?:cheapest|least expensive|lowest[\s-]priced|lowest prices?)\b", "price", False, "cheapest"),
    (r"\b(?:most expensive|priciest|costliest|highest[\s-]priced|highest prices?)\b", "price", True,
     "most expensive"),
    (rf"\b(?:top|best|highest)(?:\s+{NUM})?[\s-](?:rated|reviewed)\b|\b(?:highest|best|top) ratings?\b|"
     r"\brated (?:highest|best)\b", "rating", True, "top-rated"),
    (rf"\b(?:best|top)(?:\s+{NUM})?[\s-]?sell(?:ing|ers?)\b|\bmost (?:sold|bought|purchased|popular|sales)\b|"
     r"\bsells? the most\b", "sales", True, "best-selling"),
    (r"\b(?:newest|latest|most recent|recently added|new (?:datapods|datasets|pods|arrivals|listings))\b",
     "newest", True, "newest"),
    (r"\b(?:oldest|earliest)\b", "newest", False, "oldest"),
    (r"\b(?:largest|biggest|heaviest)\b", "size", True, "largest"),
    (r"\b(?:smallest|lightest|tiniest)\b", "size", False, "smallest"),
)
_RANKINGS = tuple((re.compile(p), key, desc, label) for p, key, desc, label in RANKINGS)


@dataclasses.dataclass
class Listing:
    """A list question: its ranking (None: by price), filters, how many, and whether it refers back."""

    sort: str
    descending: bool
    label: str | None
    count: int
    filters: Filters
    text: str  # the question with what was understood blanked out


def ranking(text: str) -> tuple[str, bool, str] | None:
    """The first of RANKINGS the text names: (sort key, descending, heading words)."""
    for pattern, key, descending, label in _RANKINGS:
        if pattern.search(text):
            return key, descending, label
    return None


def count_in(text: str, default: int) -> int:
    """The first count a question writes ("the 3 cheapest", "top five"), else `default`."""
    for match in re.finditer(rf"\b{NUM}\b", text):
        if _NOT_COUNT.match(text, match.end()):
            continue
        value = number(match.group(0))
        if value == value.to_integral_value() and 1 <= value <= 50:
            return int(value)
    return default


def refers_back(ask: Ask, text: str) -> bool:
    """Whether a follow-up means the previous answer's DataPods ("which one", "them")."""
    return bool(ask.previous_ids) and bool(REFERENCE.search(text))


def parse_listing(ask: Ask) -> Listing | None:
    """A ranking, a price range or a column filter (the category comes later, from the database)."""
    filters = Filters()
    text = price_filter(ask.lower, filters)
    text = column_filter(text, filters)
    ranked = ranking(text)
    if ranked is None and not filters.any:
        return None
    if refers_back(ask, text):
        filters.ids = list(ask.previous_ids)
    # "the largest dataset", "which one...": one; "top rated", "cheapest datapods": a list.
    default = 1 if SINGULAR.search(text) and not PLURAL.search(CHOSEN_FROM.sub(" ", text)) else DEFAULT_LIST
    if ranked is None:
        default = MAX_LIST  # a filter lists what matches
    sort, descending, label = ranked if ranked else ("price", False, None)
    return Listing(sort, descending, label, min(count_in(text, default), MAX_LIST), filters, text)


async def _list(ask: Ask, listing: Listing) -> list[PodFacts]:
    f = listing.filters
    args = {"sort": listing.sort, "order": "desc" if listing.descending else "asc", "limit": listing.count,
            **f.arguments()}
    return await ask.call("rank_datapods", args, lambda conn: queries.rank_datapods(
        conn, sort=listing.sort, descending=listing.descending, limit=listing.count, category=f.category,
        min_price=f.min_price, min_inclusive=f.min_inclusive, max_price=f.max_price, max_inclusive=f.max_inclusive,
        column=f.column, ids=f.ids))


def _heading(listing: Listing, found: int) -> str:
    n = listing.count
    noun = "DataPod" if n == 1 else "DataPods"
    if listing.label is None:
        head = f"DataPods{listing.filters.describe()}, cheapest first"
    elif listing.label.startswith("with"):
        head = f"The {'' if n == 1 else f'{n} '}{noun} {listing.label}{listing.filters.describe()}"
    else:
        head = f"The {'' if n == 1 else f'{n} '}{listing.label} {noun}{listing.filters.describe()}"
    if listing.label is not None and found < n:
        head += f" (only {found} match)"
    return head + ":"


async def answer_listing(ask: Ask, listing: Listing) -> str:
    """A ranking (cheapest, top rated, most rows...) and/or filters (price, category, column) as a table."""
    listing.text = await category_filter(ask, listing.text, listing.filters)
    pods = await _list(ask, listing)
    if not pods:
        return (f"No published DataPod{listing.filters.describe()}. Try a wider price range, another column "
                "or category, or ask “which categories are there?”.")
    answer = _heading(listing, len(pods)) + "\n\n" + pod_table(pods, added=listing.sort == "newest")
    if listing.label and len(pods) == 1:
        answer = f"{_heading(listing, 1)} {link(pods[0].title, pods[0].id)}.\n\n" + pod_table(pods)
    return answer


_COMPARE = re.compile(r"\b(?:compare|comparison|comparing|versus|vs\.?|differences? between)\b")
_SPLIT = re.compile(r"\s*(?:,|;|&|\band\b|\bvs\.?|\bversus\b|\bwith\b|\bto\b|\bagainst\b)\s*")


def match_compare(ask: Ask) -> re.Match | None:
    """"compare", "vs", "difference between"..."""
    return _COMPARE.search(ask.lower)


async def _resolve_titles(conn: asyncpg.Connection, names: list[list[str]]) -> list[PodFacts | None]:
    found = []
    for words in names:
        found.append(await queries.find_by_title(conn, words, max(1, math.ceil(len(words) * 2 / 3))))
    return found


async def answer_compare(ask: Ask, match: re.Match) -> str:
    """Compare DataPods side by side: ranked ("the two cheapest"), named by title or id, or the previous answer's."""
    # "compare X and Y": the names follow the word; "X vs Y": they surround it.
    rest = ask.lower[match.end():] if match.group(0)[0] in "cd" else (
        f"{ask.lower[:match.start()]}, {ask.lower[match.end():]}")
    listing = parse_listing(ask)
    ids = [uuid.UUID(i) for i in UUID_RE.findall(ask.lower)]
    if ids:
        pods = await ask.call("compare_datapods", {"datapod_ids": [str(i) for i in ids[:MAX_COMPARE]]},
                              lambda conn: queries.datapods_by_id(conn, ids[:MAX_COMPARE]))
    elif listing is not None and listing.label is not None:
        listing.count = min(count_in(listing.text, 2), MAX_COMPARE)
        listing.text = await category_filter(ask, listing.text, listing.filters)
        pods = await _list(ask, listing)
    elif ask.previous_ids and (REFERENCE.search(rest) or not title_words(rest)):
        previous = ask.previous_ids[:MAX_COMPARE]
        pods = await ask.call("compare_datapods", {"datapod_ids": [str(i) for i in previous]},
                              lambda conn: queries.datapods_by_id(conn, previous))
    else:
        names = [title_words(part) for part in _SPLIT.split(rest)]
        names = [n for n in names if n][:MAX_COMPARE]
        resolved = await ask.call("compare_datapods", {"titles": [" ".join(n) for n in names]},
                                  lambda conn: _resolve_titles(conn, names))
        missing = [" ".join(n) for n, pod in zip(names, resolved) if pod is None]
        pods = list({pod.id: pod for pod in resolved if pod is not None}.values())
        if len(pods) < 2:
            found = ", ".join(link(p.title, p.id) for p in pods) or "none"
            return ("To compare, name two or more DataPods by their title words (“compare Daily city weather and "
                    "Stock ticks”), or by rank (“compare the two cheapest”). "
                    + (f"I found no DataPod for “{'”, “'.join(missing)}”. " if missing else "")
                    + f"Found: {found}.")
    if len(pods) < 2:
        return "There are not two published DataPods to compare" + (
            listing.filters.describe() if listing else "") + "."
    return compare_table(pods)


def compare_table(pods: list[PodFacts]) -> str:
    """DataPods side by side, then who wins on price, rating, sales, rows and size."""
    lines = ["Side by side:", "", "| | " + " | ".join(link(p.title, p.id) for p in pods) + " |",
             "|---" * (len(pods) + 1) + "|"]
    facts = [("Price", lambda p: sui(p.price_sui)), ("Category", lambda p: cell(p.category or "uncategorised")),
             ("Rating", lambda p: rating(p.average_rating)), ("Sales", lambda p: str(p.purchase_count)),
             ("Rows", lambda p: rows(p.row_count)), ("Size", lambda p: size(p.file_size)),
             ("Columns", lambda p: cell(", ".join(p.columns[:8]) + (" …" if len(p.columns) > 8 else "")) or "—"),
             ("Added", lambda p: p.created_at.date().isoformat())]
    for name, show in facts:
        lines.append(f"| {name} | " + " | ".join(show(p) for p in pods) + " |")
    cheapest = min(pods, key=lambda p: p.price_sui)
    summary = [f"cheapest: **{cell(cheapest.title)}** ({sui(cheapest.price_sui)})"]
    counted = [p for p in pods if p.row_count is not None]
    if counted:
        most = max(counted, key=lambda p: p.row_count)
        summary.append(f"most rows: **{cell(most.title)}** ({rows(most.row_count)})")
    rated = [p for p in pods if p.average_rating]
    if rated:
        best = max(rated, key=lambda p: p.average_rating)
        summary.append(f"best rated: **{cell(best.title)}** ({rating(best.average_rating)})")
    return "\n".join(lines) + "\n\nIn short — " + "; ".join(summary) + "."


_SIZE = re.compile(r"\bhow (?:many|much) rows\b|\bhow (?:big|large)\b|\bwhat(?:'s| is) the (?:size|row count)\b|"
                   r"\brow counts?\b|\bsize of\b|\bnumber of rows\b|\bhow many (?:records|lines|entries)\b")


def match_size(ask: Ask) -> re.Match | None:
    """"how many rows", "how big", "size of"..."""
    return _SIZE.search(ask.lower)


async def answer_size(ask: Ask, match: re.Match) -> str | None:
    """Rows and size of the DataPods named (by title or id), or of the previous answer's."""
    ids = [uuid.UUID(i) for i in UUID_RE.findall(ask.lower)]
    words = title_words(_blank(ask.lower, match))
    if not ids and (refers_back(ask, ask.lower) or (not words and ask.previous_ids)):
        ids = list(ask.previous_ids)
    if ids:
        pods = await ask.call("datapod_size", {"datapod_ids": [str(i) for i in ids[:MAX_LIST]]},
                              lambda conn: queries.datapods_by_id(conn, ids[:MAX_LIST]))
    elif words:
        pod = await ask.call("datapod_size", {"title": " ".join(words)}, lambda conn: queries.find_by_title(
            conn, words, max(1, math.ceil(len(words) * 2 / 3))))
        pods = [pod] if pod is not None else []
    else:
        return None
    if not pods:
        return f"I found no published DataPod called “{' '.join(words)}”. Try its exact title, or search for it."
    if len(pods) == 1:
        pod = pods[0]
        count = ("an unknown number of rows" if pod.row_count is None
                 else f"{rows(pod.row_count)} row{'' if pod.row_count == 1 else 's'}")
        return f"{link(pod.title, pod.id)} has {count} ({size(pod.file_size)}, {plural(len(pod.columns), 'column')})."
    lines = ["Rows and size:", "", "| DataPod | Rows | Size | Columns |", "|---|---|---|---|"]
    for pod in pods:
        lines.append(f"| {link(pod.title, pod.id)} | {rows(pod.row_count)} | {size(pod.file_size)} "
                     f"| {len(pod.columns)} |")
    return "\n".join(lines)


_CATEGORIES = re.compile(r"\bcategor(?:y|ies)\b|\b(?:what|which) (?:kinds|types|sorts|topics) of\b|"
                         r"\bkinds of data\b|\btypes of data\b")


async def answer_categories(ask: Ask, _: Any) -> str:
    """The categories of published DataPods, with how many each holds and their price range."""
    found = await ask.call("list_categories", {}, assistant_queries.list_categories)
    if not found:
        return "No DataPod is published yet, so there are no categories."
    total = sum(c["datapods"] for c in found)
    lines = [f"{plural(len(found), 'category', 'categories')}, {plural(total, 'DataPod')} in all:",
             "", "| Category | DataPods | Prices |", "|---|---|---|"]
    for c in found:
        low, high = sui(c["min_price_sui"]), sui(c["max_price_sui"])
        lines.append(f"| {cell(c['category'])} | {c['datapods']} | {low if low == high else f'{low} – {high}'} |")
    return "\n".join(lines) + "\n\nAsk “the cheapest DataPods in <category>” to list one."


async def answer_search(ask: Ask, _: Any) -> str:
    """Full-text search of titles and descriptions; the help text when nothing matches."""
    query = ask.text[:500]
    found = await ask.call("search_datapods", {"query": query, "limit": 5},
                           lambda conn: assistant_queries.search_datapods(conn, query, None, None, None, 5))
    if not found:
        return f"I found no published DataPod matching “{cell(' '.join(ask.text.split())[:80])}”.\n\n" + HELP
    lines = [f"DataPods matching “{cell(' '.join(ask.text.split())[:80])}”:", ""]
    for n, pod in enumerate(found, 1):
        rated = rating(Decimal(str(pod["average_rating"])))
        description = " ".join((pod["description"] or "").split())
        lines.append(f"{n}. {link(pod['title'], pod['datapod_id'])} ({cell(pod['category'] or 'uncategorised')}) — "
                     f"{sui(pod['price_sui'])}, {rated}, {pod['purchase_count']} sold."
                     + (f" {description}" if description else ""))
    return "\n".join(lines)


async def answer_data_question(ask: Ask, _: Any) -> str | None:
    """A question about the rows of a dataset the asker holds (dataset_query's built-in questions)."""
    return await dataset_query.builtin_answer(ask.app, ask.user_id, ask.text) if ask.app is not None else None


INTENTS: list[Intent] = [
    Intent("greeting", match_greeting, answer_greeting),
    # Before the rankings: "top values of city in Daily city weather" is about rows, not about pods.
    # It answers only when the question names a dataset the asker bought or sells.
    Intent("ask_your_data", lambda ask: True, answer_data_question),
    Intent("my_purchases", lambda ask: _PURCHASES.search(ask.lower), answer_purchases),
    Intent("my_sales", lambda ask: _SALES.search(ask.lower), answer_sales),
    Intent("compare", match_compare, answer_compare),
    Intent("listing", parse_listing, answer_listing),
    Intent("size", match_size, answer_size),
    Intent("categories", lambda ask: _CATEGORIES.search(ask.lower), answer_categories),
    # Insert new intents above this line: search always matches.
    Intent("search", lambda ask: True, answer_search),
]


async def route(ask: Ask) -> tuple[str, str]:
    """The first intent that answers: its name and its markdown answer."""
    for intent in INTENTS:
        matched = intent.matcher(ask)
        if not matched:
            continue
        try:
            answer = await intent.handler(ask, matched)
        except ToolFailed as exc:
            return intent.name, f"I could not read the marketplace just now ({exc}). Please try again."
        if answer is not None:
            return intent.name, answer
    return "help", HELP

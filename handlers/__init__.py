"""Socket.IO namespaces and REST routes, one module per domain."""

from handlers.assistant import AssistantNamespace
from handlers.chain import ChainNamespace
from handlers.games import GamesNamespace
from handlers.marketplace import MarketplaceNamespace
from handlers.purchases import PurchasesNamespace

NAMESPACES = (AssistantNamespace, MarketplaceNamespace, PurchasesNamespace, GamesNamespace, ChainNamespace)

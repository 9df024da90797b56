"""Socket.IO namespaces and REST routes, one module per domain."""

from handlers.assistant import AssistantNamespace
from handlers.chain import ChainCommands
from handlers.dao import DaoCommands
from handlers.games import GamesNamespace
from handlers.marketplace import MarketplaceNamespace
from handlers.mining import MiningCommands
from handlers.purchases import PurchasesNamespace
from server.edge.namespace import HubNamespace


class ChainNamespace(ChainCommands, DaoCommands, MiningCommands, HubNamespace):
    """KVP chain feeds: blocks, transactions, mining, DAO tallies (anyone may watch).

    Proposals are voted with chain wallets, so the DAO's commands and channel share /chain; each
    domain declares its own in its handler module, which never imports the other.
    """

    name = "/chain"
    allow_anonymous = True
    channels = ChainCommands.channels + DaoCommands.channels + MiningCommands.channels
    events = ChainCommands.events + DaoCommands.events + MiningCommands.events


NAMESPACES = (AssistantNamespace, MarketplaceNamespace, PurchasesNamespace, GamesNamespace, ChainNamespace)

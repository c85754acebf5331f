from twisted.application.service import ServiceMaker

zwrmAgent = ServiceMaker(
    "zwrm agent",
    "zwrm.agent.tap",
    "The zwrm host agent: runs the host's virtual machines, images and volumes.",
    "zwrm-agent",
)

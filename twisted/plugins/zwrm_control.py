from twisted.application.service import ServiceMaker

zwrmControl = ServiceMaker(
    "zwrm control plane",
    "zwrm.control.tap",
    "The zwrm control plane: WAMP router, scheduler, health monitor, image registry.",
    "zwrm-control",
)

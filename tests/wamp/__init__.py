import txaio

txaio.use_twisted()

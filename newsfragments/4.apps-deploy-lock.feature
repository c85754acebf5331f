Deploys of different apps no longer wait for each other's machines to start: a slow host delays
only the app with a machine on it; deploys, scales and destroys of one app stay ordered.

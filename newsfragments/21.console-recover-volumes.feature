The console's Remove dialog can recover the host's volumes from their replicas (as `zwrm host remove --recover-volumes`) and says where each was recovered.

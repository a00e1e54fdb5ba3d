//! castor failover tests: the end-to-end suite (issue 5). Empty until the service exists.

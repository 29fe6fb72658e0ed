# Written by vmrig next to vmrig_driver.py; runs the test script.
import vmrig_driver

vmrig_driver.main()
